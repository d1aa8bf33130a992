"""l2sweep: a tracked, reproducible pipeline for studying regularization in small Keras networks."""

import os

# MLflow's log lines go through the stages' logging, in their one format (l2sweep.base.cli),
# not through the handler and format MLflow installs for itself.
os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")

__version__ = "0.1.0"
