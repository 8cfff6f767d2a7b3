"""The MLflow Model Registry side: registered models, the pyfunc model, promotion and its lock."""
