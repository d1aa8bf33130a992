"""MLflow tracking: the store, the sweep's parent run and one child run per trained model, on one background thread."""
