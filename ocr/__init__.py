"""``python -m ocr PHOTO...``: read the text of photos in one call (a leaf over the pipeline)."""
