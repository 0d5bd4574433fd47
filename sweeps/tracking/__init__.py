"""The sweep's record in MLflow: the schema (every tag, param prefix and run name), the writer, the
reader, sync from storage, the model registry."""
