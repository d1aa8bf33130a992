"""l2sweep: a tracked, reproducible pipeline for studying regularization in small Keras networks."""

import os

# TensorFlow's C++ runtime logs a harmless "NodeDef mentions attribute use_unbounded_threadpool"
# error for every fit (a tf.data attribute newer than the runtime); level 3 keeps such C++
# chatter out of the user's log. Python-level errors are unaffected. Set it yourself to see it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

__version__ = "0.1.0"
