"""A user's mistake raises the project's error type where the input is checked (pipeline.errors): a bad setting a
ConfigError, bad input data an InputError, a missing input a MissingInputError; a guard of an internal invariant
stays a plain ValueError (a bug, with its traceback)."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline import runconfig, settings
from pipeline.aggregate import AggregateConfig, read_codebook
from pipeline.config import get_preset
from pipeline.errors import ConfigError, InputError, MissingInputError, UserError
from pipeline.evaluate import evaluate, read_landmarks, read_revisitop_gnd
from pipeline.index.params import choose_index, parse_size
from pipeline.index.whitening import fit as fit_whitening
from pipeline.manifest import split_shards
from pipeline.query import check_k
from pipeline.rerank import RerankConfig
from pipeline.rerank.global_rerank import GlobalRerankConfig, parse_method
from pipeline.rerank.match import pad
from pipeline.serve.settings import ServeSettings

DATA = {"index": "i", "queries": "q"}

SETTINGS_MISTAKES: dict[str, Callable[[], Any]] = {
    "unknown preset": lambda: get_preset("delg-r51"),
    "re-ranking trials": lambda: RerankConfig(trials=0),
    "global re-ranking beta": lambda: GlobalRerankConfig(sg_beta=0),
    "re-ranking method": lambda: parse_method("bogus"),
    "serve max_k": lambda: ServeSettings(index="i", max_k=0),
    "aggregation clusters": lambda: AggregateConfig(clusters=0),
    "memory budget spelling": lambda: parse_size("4XB"),
    "query k": lambda: check_k(0),
    "shard size": lambda: split_shards(None, 0),
    "run config unknown key": lambda: runconfig.parse_run_config(
        {"out": "o", "data": DATA, "search": {"kk": 1}}
    ),
    "run config wrong type": lambda: runconfig.parse_run_config(
        {"out": "o", "data": DATA, "search": {"k": "x"}}
    ),
    "run config missing data": lambda: runconfig.parse_run_config({"out": "o"}),
    "run config protocol": lambda: runconfig.parse_run_config(
        {"out": "o", "data": {**DATA, "protocol": "trec"}}
    ),
    "evaluation protocol": lambda: evaluate("r.parquet", "gt.csv", "trec"),
    "whitening dims": lambda: fit_whitening(np.ones((4, 3), np.float32), 9),
}


@pytest.mark.parametrize("mistake", sorted(SETTINGS_MISTAKES))
def test_a_bad_setting_is_a_config_error(mistake: str) -> None:
    with pytest.raises(ConfigError):
        SETTINGS_MISTAKES[mistake]()


def test_a_setting_of_the_wrong_type_names_its_key() -> None:
    setting = next(s for s in settings.settings_of(RerankConfig) if s.key == "trials")
    with pytest.raises(ConfigError, match=r"rerank\.trials='many' must be int"):
        settings.check_value(setting, "many", "rerank.trials")


def test_a_run_config_file_of_another_kind_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "run.txt"
    path.write_text("out = 'o'")
    with pytest.raises(ConfigError, match=r"must end in \.toml"):
        runconfig.load_run_config(str(path))
    broken = tmp_path / "run.toml"
    broken.write_text("out = ")
    with pytest.raises(ConfigError, match="invalid TOML"):
        runconfig.load_run_config(str(broken))


def test_bad_input_files_are_input_errors(tmp_path: Path) -> None:
    gnd = tmp_path / "gnd.pkl"
    gnd.write_bytes(pickle.dumps({"imlist": ["a"]}))
    with pytest.raises(InputError, match="not a revisitop gnd file"):
        read_revisitop_gnd(str(gnd))
    landmarks = tmp_path / "landmarks.csv"
    landmarks.write_text("id,label\na,1\n")
    with pytest.raises(InputError, match="needs columns id, landmark_id"):
        read_landmarks(str(landmarks))
    with pytest.raises(InputError, match="both must be ≥ 1"):
        choose_index(0, 8)  # an empty store


def test_a_missing_input_is_a_missing_input_error(tmp_path: Path) -> None:
    with pytest.raises(MissingInputError, match="no VLAD codebook"):
        read_codebook(str(tmp_path / "nowhere"))


def test_an_internal_guard_stays_a_plain_value_error() -> None:
    """pad() with no arrays is a caller's bug, not a user's mistake: it must keep its traceback (exit 1)."""
    with pytest.raises(ValueError) as caught:
        pad([])
    assert not isinstance(caught.value, UserError)
