"""Reports read back from MLflow: tables, plots and HTML (reads MLflow only, never Ray)."""
