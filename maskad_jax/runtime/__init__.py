"""What ships beside every export and runs without this package: serve_export (serve.py: loading, the
geometry's arithmetic, tiles, regions, overlays) and serve_http (the HTTP service and its page).
They import nothing of maskad_jax, so they sit below everything and data/ reuses their arithmetic.
"""
