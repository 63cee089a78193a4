"""Prompt files, job planning (seeds, names, shards) and class balancing — no model needed."""
from __future__ import annotations

import json
import logging

import pytest

from inference.balance import balance_prompts, plan_balance
from inference.generate import plan_jobs, shard_jobs
from inference.prompts import PromptFileError, PromptRow, read_prompts, write_prompts_jsonl
from inference.sampler import derive_seed


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_txt_skips_comments_and_blanks_and_keeps_line_numbers(tmp_path):
    p = write(tmp_path, "p.txt", "# header\nLeft effusion.\n\n  Clear lungs.  \n")
    rows = read_prompts(p, default_n=3)
    assert [(r.prompt, r.index, r.n) for r in rows] == [("Left effusion.", 2, 3), ("Clear lungs.", 4, 3)]


def test_csv_columns_quotes_and_defaults(tmp_path):
    p = write(tmp_path, "p.csv", 'prompt,n,seed,label,negative_prompt\n'
                                 '"Effusion, left.",2,7,effusion,text\n'
                                 'Normal.,,,,\n')
    a, b = read_prompts(p, default_n=5)
    assert (a.prompt, a.n, a.seed, a.label, a.negative_prompt, a.index) == (
        "Effusion, left.", 2, 7, "effusion", "text", 2)
    assert (b.n, b.seed, b.label, b.negative_prompt, b.index) == (5, None, None, None, 3)


def test_csv_errors_name_every_bad_line(tmp_path):
    p = write(tmp_path, "p.csv", 'prompt,n\nok,1\nbad n,zero\n,2\ntoo,many,fields\nneg,-1\n"multi\nline",1\nx,1.5\n')
    with pytest.raises(PromptFileError) as e:
        read_prompts(p)
    problems = "\n".join(e.value.problems)
    for line, what in [(3, "'n' must be a whole number"), (4, "empty or missing 'prompt'"),
                       (5, "has 3 fields but the header has 2"), (6, "'n' must be >= 1"),
                       (9, "'n' must be a whole number")]:
        assert f"p.csv:{line}: {what}" in problems, problems
    assert "p.csv:2:" not in problems and "p.csv:7:" not in problems  # the quoted two-line prompt is fine


def test_csv_without_prompt_header(tmp_path):
    with pytest.raises(PromptFileError, match="needs a 'prompt' column"):
        read_prompts(write(tmp_path, "p.csv", "text,n\nhello,1\n"))


def test_jsonl_errors_and_skip_bad(tmp_path, caplog):
    p = write(tmp_path, "p.jsonl", '{"prompt": "A.", "n": 2, "label": "x"}\n{broken\n[1, 2]\n'
                                   '{"n": 1}\n{"prompt": "B.", "seed": -3}\n{"prompt": "C.", "n": true}\n')
    with pytest.raises(PromptFileError) as e:
        read_prompts(p)
    text = str(e.value)
    assert "p.jsonl:2: bad JSON" in text and "p.jsonl:3: JSON list instead of an object" in text
    assert "p.jsonl:4: empty or missing 'prompt'" in text and "p.jsonl:5: 'seed' must be >= 0" in text
    assert "p.jsonl:6: 'n' must be a whole number" in text and "--skip-bad-lines" in text
    with caplog.at_level(logging.WARNING):
        rows = read_prompts(p, skip_bad=True)
    assert [(r.prompt, r.n, r.label, r.index) for r in rows] == [("A.", 2, "x", 1)]
    assert "p.jsonl:2" in caplog.text


def test_file_level_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--prompts"):
        read_prompts(tmp_path / "missing.txt")
    with pytest.raises(PromptFileError, match="use .txt, .csv or .jsonl"):
        read_prompts(write(tmp_path, "p.yaml", "a"))
    bad = tmp_path / "p.txt"
    bad.write_bytes(b"fine\nalso fine\n\xff\xfe broken\n")
    with pytest.raises(PromptFileError, match=r"p.txt:3: not UTF-8"):
        read_prompts(bad)
    with pytest.raises(PromptFileError, match="no prompts found"):
        read_prompts(write(tmp_path, "e.txt", "# only a comment\n\n"))


def test_jsonl_round_trip(tmp_path):
    rows = [PromptRow("A, b.", 2, 1, seed=4, label="l", negative_prompt="n"), PromptRow("C.", 1, 2)]
    write_prompts_jsonl(tmp_path / "r.jsonl", rows)
    assert read_prompts(tmp_path / "r.jsonl") == rows


# ---------------------------------------------------------------- job planning

def test_seeds_and_names():
    rows = [PromptRow("A.", 2, 3), PromptRow("B.", 3, 5, seed=100, label="x y/z")]
    jobs = list(plan_jobs(rows, base_seed=9, negative_prompt="", fmt="png", label_folders=True))
    assert [j.seed for j in jobs] == [derive_seed(9, 3, 0), derive_seed(9, 3, 1), 100, 101, 102]
    assert len({j.key for j in jobs}) == 5
    assert jobs[0].key.startswith("unlabelled/00003_0000_") and jobs[2].key.startswith("x_y_z/00005_0000_")
    # the same row always gets the same images; an edited prompt gets new names (never reuses old images)
    again = list(plan_jobs(rows, base_seed=9, negative_prompt="", fmt="png", label_folders=True))
    assert [j.key for j in again] == [j.key for j in jobs]
    edited = list(plan_jobs([PromptRow("A!", 2, 3)], base_seed=9, negative_prompt="", fmt="png", label_folders=True))
    assert not {j.key for j in edited} & {j.key for j in jobs}
    assert derive_seed(9, 3, 0) != derive_seed(10, 3, 0) != derive_seed(9, 4, 0) and derive_seed(9, 3, 0) < 2**63


def test_shards_partition_the_jobs():
    rows = [PromptRow(f"P{i}.", 3, i + 1) for i in range(5)]
    keys = [j.key for j in plan_jobs(rows, base_seed=0, negative_prompt="", fmt="dcm", label_folders=False)]
    for count in (1, 2, 3, 4):
        shards = [[j.key for j in shard_jobs(plan_jobs(rows, base_seed=0, negative_prompt="", fmt="dcm",
                                                       label_folders=False), i, count)] for i in range(count)]
        assert sorted(sum(shards, [])) == sorted(keys)  # union = everything, no overlap
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError, match="outside"):
        shard_jobs([], 2, 2)


# ---------------------------------------------------------------- balancing

def test_plan_balance_spreads_the_deficit():
    templates = {"b": [PromptRow("B1.", 1, 1), PromptRow("B2.", 1, 2, seed=5)], "c": [PromptRow("C.", 1, 3)],
                 "a": [PromptRow("A.", 1, 4)]}
    rows = plan_balance({"a": 10, "b": 3, "c": 9}, templates)
    assert [(r.prompt, r.n, r.label, r.seed) for r in rows] == [("B1.", 4, "b", None), ("B2.", 3, "b", 5),
                                                              ("C.", 1, "c", None)]
    assert [r.index for r in rows] == [1, 2, 3]
    # a class only in the prompts counts as 0 real images; one without any prompt is an error
    assert sum(r.n for r in plan_balance({"a": 4}, {"d": [PromptRow("D.", 1, 1)]})) == 4
    with pytest.raises(ValueError, match="no prompt for class.*'b'"):
        plan_balance({"a": 4, "b": 1}, {"a": templates["a"]})


def test_balance_from_manifest_reports_and_prompt_file(tmp_path):
    lines = ["image,text,finding"] + [f"n{i}.png,Normal chest {i}.,normal" for i in range(6)] + \
            [f"e{i}.png,Left effusion {i}.,effusion" for i in range(2)] + ["u.png,Unlabelled.,"]
    manifest = write(tmp_path, "m.csv", "\n".join(lines) + "\n")
    rows = balance_prompts(manifest, "finding")  # no prompt file: the minority class's own reports
    assert {(r.prompt, r.n, r.label) for r in rows} == {("Left effusion 0.", 2, "effusion"),
                                                       ("Left effusion 1.", 2, "effusion")}
    prompts = [PromptRow("Effusion.", 1, 1, label="effusion"), PromptRow("Clear.", 1, 2, label="normal")]
    rows = balance_prompts(manifest, "finding", prompts=prompts, target=10)
    assert {(r.prompt, r.n) for r in rows} == {("Effusion.", 8), ("Clear.", 4)}
    with pytest.raises(ValueError, match="line\\(s\\) \\[2\\]"):
        balance_prompts(manifest, "finding", prompts=[prompts[0], PromptRow("X.", 1, 2)])
    with pytest.raises(Exception, match="finding2"):
        balance_prompts(manifest, "finding2")
    assert json.dumps([r.n for r in rows])  # plain ints, serialisable into the plan file


def test_balance_reads_a_prepared_manifest_as_it_is(tmp_path):
    """finetune.prepare writes 'labels' ('|'-separated) and 'report': --balance needs no column flags, and a
    multi-label image counts for each of its classes (and its report serves each as a prompt)."""
    lines = ["image,report,labels,patient,split"]
    lines += [f"n{i}.png,FINDINGS: Clear {i}.,No Finding,p{i},train" for i in range(5)]
    lines += ["a.png,FINDINGS: Big heart and effusion.,Cardiomegaly|Pleural Effusion,q1,train",
              "b.png,IMPRESSION: Effusion.,Pleural Effusion,q2,train", "c.png,Unknown.,,q3,train"]
    manifest = write(tmp_path, "manifest.csv", "\n".join(lines) + "\n")
    rows = balance_prompts(manifest, "label")
    planned = {}
    for r in rows:
        planned[r.label] = planned.get(r.label, 0) + r.n
    assert planned == {"Cardiomegaly": 4, "Pleural Effusion": 3}
    assert {r.prompt for r in rows if r.label == "Cardiomegaly"} == {"Big heart and effusion."}
    assert {r.prompt for r in rows if r.label == "Pleural Effusion"} == {"Big heart and effusion.", "Effusion."}
