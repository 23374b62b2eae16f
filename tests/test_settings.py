"""Serving-time settings given on a command line: ``FIELD=JSON`` and sweep grids."""

from __future__ import annotations

import pytest

from diekae_rag.config import parse_grid, parse_settings


def test_grid_values_are_json_so_false_is_off():
    grid = parse_grid(["pointer_first_unspaced=true,false", "pointer_sharpness=1,2.5", 'pointer_piece_keys="both"'])
    assert grid == {"pointer_first_unspaced": [True, False], "pointer_sharpness": [1, 2.5],
                    "pointer_piece_keys": ["both"]}
    assert grid["pointer_first_unspaced"][1] is False  # the string "false" would be truthy


def test_grid_text_without_quotes_stays_text_and_unknown_fields_are_refused():
    assert parse_grid(["pointer_piece_keys=both"]) == {"pointer_piece_keys": ["both"]}
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        parse_grid(["no_such_field=1,2"])


def test_settings_are_json():
    assert parse_settings(["pointer_continue_bonus=0", "pointer_first_unspaced=false"]) == {
        "pointer_continue_bonus": 0, "pointer_first_unspaced": False}
