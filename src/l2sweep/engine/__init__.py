"""The engine: the model definition, Keras callbacks, and the compiled loop that trains K models at once."""

from l2sweep.base.cli import import_tensorflow

import_tensorflow()  # first, so that Keras' import of TensorFlow prints no start-up notices
