"""The FAISS index stage: train on a random sample, add shards in parallel Ray tasks, merge, measure, search.

Output layout under an index URL ``OUT``::

    OUT/trained.faiss              the trained, empty index every add task starts from  } removed after a
    OUT/parts/part-00000.faiss     partial index of add task 0 (its shards' vectors,     } successful build
                                   global ids)                                           } unless
    OUT/parts/part-00000.ids.parquet  that task's id map                                 } keep_intermediate
    OUT/index.faiss                the merged index (whole, or the header of an on-disk index)
    OUT/index.ivfdata              inverted lists of an on-disk index (local outputs only)
    OUT/ids.parquet                id map: id int64 (faiss id) ↔ image_id string
    OUT/refine.faiss               trained, empty scalar quantizer of the refinement codes (refined indexes)
    OUT/refine-<first id>.codes    refinement codes of ids [first id, first id + n), one file per added shard
    OUT/params.json                factory, reason, refine, dim, ntotal, next_id, nprobe, k_factor (+ why),
                                   on_disk, timings
    OUT/quality.json               recall@1/10/100, queries/s and cost per nprobe (× k_factor when refined)

Ids: the store's committed shards in shard order, the n-th row overall gets id n (shard base offsets from the
shards' row counts); added shards continue from ``next_id``; removed ids are never reused.

Names load their submodule on first use (pipeline.lazy): the CLI reads option choices from
pipeline.index.params without importing faiss.
"""

from __future__ import annotations

from pipeline.lazy import lazy_exports

lazy_exports(
    __name__,
    {
        "build": ("BuildConfig", "IndexBuildSummary", "build_index"),
        "params": ("IndexChoice", "choose_index", "parse_size"),
        "quality": ("QualityConfig", "quality_report", "recall_at"),
        "search": ("SearchConfig", "SearchSummary", "search"),
        "update": ("IndexAddSummary", "IndexRemoveSummary", "add_shards", "new_shards", "remove_ids"),
    },
)
