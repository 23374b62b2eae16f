"""Serving-time settings given on a command line: ``FIELD=JSON`` and sweep grids."""

from __future__ import annotations

import pytest

from diekae_rag.config import parse_grid, parse_settings


def test_grid_values_are_json_so_false_is_off():
    grid = parse_grid(["first_unspaced=true,false", "sharpness=1,2.5", 'gain_scale="x"'])
    assert grid == {"first_unspaced": [True, False], "sharpness": [1, 2.5], "gain_scale": ["x"]}
    assert grid["first_unspaced"][1] is False  # the string "false" would be truthy


def test_grid_text_without_quotes_stays_text_and_unknown_fields_are_refused():
    assert parse_grid(["gain_scale=high"]) == {"gain_scale": ["high"]}
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        parse_grid(["no_such_field=1,2"])


def test_settings_are_json():
    assert parse_settings(["continue_bonus=0", "first_unspaced=false"]) == {"continue_bonus": 0,
                                                                           "first_unspaced": False}


def test_squad_metrics_and_the_copy_rate():
    from diekae_rag.evaluation import contains, copies, exact_match, f1
    assert exact_match("The Saxon Garden.", "saxon garden") == 1.0 and exact_match("Saxon Gardens", "Saxon Garden") == 0
    run_on = "22 per cent of classes in maintained primary schools"
    assert contains(run_on, "22") and exact_match(run_on, "22") == 0 and 0 < f1(run_on, "22") < 0.25
    assert f1("Ithpelith, a weaver", "Ithpelith") == pytest.approx(2 / 3) and f1("", "x") == 0.0 and f1("", "") == 1.0
    passage = "Marsul Vantrel is a glassmaker from Calgra."
    assert copies("He is a glassmaker from Calgra", [passage]) and not copies("a glassmaker", [passage])
    assert not copies("glassmaker from Paris", [passage]) and not copies("Vantrel a glassmaker", [passage])
