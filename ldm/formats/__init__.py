"""Every weight format: reading and writing model files, and the one safe builder of networks from stored configs."""
