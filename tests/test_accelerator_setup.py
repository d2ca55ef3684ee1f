"""Tests for modeling_missrec.accelerator_setup: the precision and threads a run gets."""

from __future__ import annotations

from unittest import mock

from modeling_missrec.accelerator_setup import resolve_mixed_precision


def test_mixed_precision_auto_is_bf16_only_where_the_cpu_computes_it():
    with mock.patch("torch.cuda.is_available", return_value=False):
        for native in (True, False):
            with mock.patch("modeling_missrec.accelerator_setup.cpu_has_native_bf16", return_value=native):
                assert resolve_mixed_precision("auto") == ("bf16" if native else "no")
    for explicit in ("no", "fp16", "bf16"):
        assert resolve_mixed_precision(explicit) == explicit
