"""Training recipes (ml_collections).  Each module defines ``get_config()``; see configs/common.py."""
