"""A tiny versioned demo index (2 views of each demo photo, the demo's ImageNet
MobileNetV2 from ../shared) for the query and service tests.

Two versions are built once per session: v000001 indexes every photo, v000002 one photo fewer. LATEST is put
back on v000001, so a test can publish v000002 itself (a hot swap without an extraction in the test).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import versions
from pipeline.demo import SHARED_WEIGHTS, make_demo_dataset
from pipeline.reindex import ReindexConfig, reindex

DROPPED = "retina"  # the photo v000002 no longer indexes


@dataclass(frozen=True)
class DemoIndex:
    root: str  # versioned root; LATEST = v000001 at the start of every test
    data: Path  # the demo dataset folder (images/, index.parquet, queries.parquet)

    def photo(self, image_id: str) -> Path:
        return self.data / "images" / f"{image_id}.jpg"


@pytest.fixture(scope="session")
def demo_index(tmp_path_factory, ray_cluster) -> DemoIndex:
    data = tmp_path_factory.mktemp("demo-data")
    dataset = make_demo_dataset(str(data), views=2)
    root = str(tmp_path_factory.mktemp("demo-root"))
    if not SHARED_WEIGHTS.is_file():
        pytest.skip(f"{SHARED_WEIGHTS} is absent: a random-init model cannot be loaded again by a query")
    config = ReindexConfig(preset="delg-mobilenetv2-imagenet", weights_url=str(SHARED_WEIGHTS), shard_size=8)
    reindex(dataset.index_manifest, root, config, ray_address=ray_cluster)
    table = pq.read_table(dataset.index_manifest)
    kept = table.filter(pa.array([not i.startswith(DROPPED) for i in table.column("id").to_pylist()]))
    smaller = str(data / "index-v2.parquet")
    pq.write_table(kept, smaller)
    reindex(smaller, root, config, ray_address=ray_cluster)
    return DemoIndex(root, data)


@pytest.fixture
def demo_root(demo_index: DemoIndex) -> DemoIndex:
    """The demo index with v000001 live."""
    versions.publish(demo_index.root, versions.version_name(1))
    return demo_index
