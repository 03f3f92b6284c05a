"""`octssl demo`: the whole pipeline on a synthetic corpus, and closing its loop."""
