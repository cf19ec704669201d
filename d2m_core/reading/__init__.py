"""Reading: listing and discovering img2dataset tars, parsing them, and the loader that feeds batches."""
