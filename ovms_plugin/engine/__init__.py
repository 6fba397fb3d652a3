"""Engine workers: one process per loaded model, each owning one OpenVINO pipeline."""
