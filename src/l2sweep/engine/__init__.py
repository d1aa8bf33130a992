"""The engine: the model definition, Keras callbacks, and the compiled loop that trains K models at once."""
