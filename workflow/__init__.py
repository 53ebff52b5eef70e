"""The application: the stage list of run_pipeline.py, its report, and the dataset registry."""
