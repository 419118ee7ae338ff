"""Values a user picks from (CLI option choices, run-config values), declared once and without heavy imports:
`landmark-index --help` lists them without loading numpy or pyarrow. The stages check against them."""

from __future__ import annotations

GLOBAL_DTYPES = ("float16", "float32")  # global descriptor encodings of a descriptor store (pipeline.store)
LOCAL_DTYPES = ("float16", "int8", "float32")  # local descriptor encodings (pipeline.store)
PROTOCOLS = ("revisitop", "gldv2-retrieval", "gldv2-recognition")  # evaluation protocols (pipeline.evaluate)
