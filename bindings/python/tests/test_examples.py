"""The Python examples at the repository root run to completion (they check their own results)."""

import glob
import os
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "..", "examples", "python")


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(EXAMPLES, "*.py"))), ids=os.path.basename)
def test_example_runs(path):
    done = subprocess.run([sys.executable, path], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith("ok")


def test_examples_exist():
    assert glob.glob(os.path.join(EXAMPLES, "*.py"))


def test_sparse_policy_example_inspects_its_selection():
    path = os.path.join(EXAMPLES, "02_sparse_policy.py")
    done = subprocess.run([sys.executable, path], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "canonical form: sinks=4,window=64,pages=128;layers=0:dense" in out
    assert "ParseError at byte 24" in out
    assert "layer 0: dense" in out and "Selection(num_kv_heads=2, seq_len=1001" in out
    assert out.strip().endswith("ok")


def test_gemfilter_example_finds_the_needle_and_answers_from_it():
    path = os.path.join(EXAMPLES, "03_gemfilter.py")
    done = subprocess.run([sys.executable, path], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "needle recall per layer: 0: 0.06, 1: 1.00" in out
    assert "filter layer 1 (the earliest that finds the needle)" in out
    assert "kept 256 of 6000 tokens" in out and "needle kept: yes" in out
    assert "layer 3: decode over 257 tokens vs all 6001" in out
    assert "17 after freeing the long one" in out
    assert out.strip().endswith("ok")


def test_cluster_example_retrieves_calibrates_and_reloads():
    path = os.path.join(EXAMPLES, "04_cluster_retrieval.py")
    done = subprocess.run([sys.executable, path], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "397 clusters and 40 coarse clusters per KV head" in out
    assert "keeps 0.100 of the clustered keys (target 0.1)" in out
    assert "appended 400 tokens: 400 assigned" in out
    assert out.strip().endswith("ok")
