"""Looking at a model and its data: the report, charts, Grad-CAM, the data doctor, camera shifts."""
