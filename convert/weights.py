"""``python -m convert.weights``: the same command as ``python -m models.weights`` (fetch
public weights with their descriptions), under the build tools' name.

Example:
    python -m convert.weights fetch ppocr-v6-rec
"""

from models.weights import main

if __name__ == "__main__":
    raise SystemExit(main())
