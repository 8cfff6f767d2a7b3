"""Named model configs (JSON), read by `gram.model_config.model_config(name)`."""
