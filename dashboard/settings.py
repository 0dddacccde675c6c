"""Names shared by the launcher and the app (no Streamlit import here)."""

RUNS_DIR_ENV = "DIFFENC_RUNS_DIR"  # the runs folder the dashboard opens with
STORAGE_ENV = "DIFFENC_OPTUNA_STORAGE"  # an Optuna storage URL or file to offer first on the Tuning page
