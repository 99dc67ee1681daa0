"""The database layer: SQLAlchemy 2 models, engine/session factories, repositories and migrations."""
