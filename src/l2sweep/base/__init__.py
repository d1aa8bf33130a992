"""The base layer: configuration, command-line conventions, signals, files, data. Imports nothing above it."""
