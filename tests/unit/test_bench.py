"""Tests of `vllm-clasp bench` without an engine: questions, methods, Spec-Bench arithmetic,
report files, CLI (vllm_clasp.tools: questions, methods, report, bench, cpu_env, demo)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from vllm_clasp.tools import cli, cpu_env, demo
from vllm_clasp.tools.bench import BenchOptions
from vllm_clasp.tools.bench_cli import options_from_args
from vllm_clasp.tools.methods import parse_int_list, parse_methods
from vllm_clasp.tools.questions import (
    MT_BENCH_CATEGORIES,
    Question,
    load_questions,
    resolve_questions,
    select_questions,
)
from vllm_clasp.tools.report import (
    BASELINE,
    GROUPS,
    acceptance_length,
    count_identical,
    find_row,
    first_difference,
    format_report,
    mismatches,
    speedup,
    summarize,
    tokens_per_step,
    write_results,
)

SPEC_BENCH = Path(__file__).resolve().parents[3] / "shared" / "data" / "spec_bench" / "question.jsonl"


def write_questions(path: Path) -> Path:
    lines = []
    qid = 0
    for category in MT_BENCH_CATEGORIES:
        for i in range(3):
            qid += 1
            lines.append({"question_id": qid, "category": category,
                          "turns": [f"{category} {i}", "second turn"]})
    for group in GROUPS[1:]:
        for i in range(4):
            qid += 1
            lines.append({"question_id": qid, "category": group, "turns": [f"{group} {i}"]})
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


# --------------------------------------------------------------------------- questions


def test_load_questions_groups_mt_bench_categories(tmp_path):
    questions = load_questions(write_questions(tmp_path / "q.jsonl"))
    assert len(questions) == 8 * 3 + 5 * 4
    assert {q.group for q in questions} == set(GROUPS)
    writing = next(q for q in questions if q.category == "writing")
    assert writing.group == "mt_bench" and writing.text == "writing 0"  # first turn only


def test_select_per_category_offset_and_round_robin(tmp_path):
    questions = load_questions(write_questions(tmp_path / "q.jsonl"))
    chosen = select_questions(questions, ["mt_bench", "qa"], per_category=3)
    assert [q.group for q in chosen] == ["mt_bench"] * 3 + ["qa"] * 3
    # mt_bench round-robin over its categories: writing, roleplay, reasoning, ...
    assert [q.text for q in chosen[:3]] == ["writing 0", "roleplay 0", "reasoning 0"]
    assert [q.text for q in chosen[3:]] == ["qa 0", "qa 1", "qa 2"]
    later = select_questions(questions, ["mt_bench", "qa"], per_category=2, offset=8)
    # mt_bench index 8 starts the second lap; qa has only 4 questions, none after offset 8.
    assert [q.text for q in later] == ["writing 1", "roleplay 1"]


def test_offset_halves_are_disjoint(tmp_path):
    questions = load_questions(write_questions(tmp_path / "q.jsonl"))
    first = select_questions(questions, GROUPS, per_category=2)
    second = select_questions(questions, GROUPS, per_category=2, offset=2)
    assert len(first) == len(second) == 12
    assert not {q.question_id for q in first} & {q.question_id for q in second}


def test_bad_question_line_names_file_and_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question_id": 1, "category": "qa", "turns": ["x"]}\n{"oops": 1}\n')
    with pytest.raises(ValueError, match=r"q.jsonl:2"):
        load_questions(path)


@pytest.mark.skipif(not SPEC_BENCH.is_file(), reason="shared Spec-Bench data not present")
def test_real_spec_bench_file():
    questions = load_questions(SPEC_BENCH)
    assert len(questions) == 480
    counts = {g: sum(q.group == g for q in questions) for g in GROUPS}
    assert counts == {g: 80 for g in GROUPS}
    mt = select_questions(questions, ["mt_bench"], per_category=8)
    assert sorted(q.category for q in mt) == sorted(MT_BENCH_CATEGORIES)


def test_missing_default_questions_file_explains_flag(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="--questions"):
        resolve_questions(BenchOptions())


# --------------------------------------------------------------------------- methods


def test_parse_builtin_methods():
    methods = parse_methods("plain,clasp,ngram")
    assert [m.name for m in methods] == ["plain", "clasp", "ngram"]
    assert methods[0].speculative_config is None
    assert methods[1].speculative_config == {"method": "clasp"}
    assert methods[2].speculative_config == {"method": "ngram", "num_speculative_tokens": 4}


def test_parse_named_json_with_commas_and_plain_first():
    methods = parse_methods(
        'clasp8={"method": "clasp", "clasp_skip_layers": 8, "clasp_never_skip": [0, 1]},plain')
    assert [m.name for m in methods] == ["plain", "clasp8"]
    assert methods[1].speculative_config == {
        "method": "clasp", "clasp_skip_layers": 8, "clasp_never_skip": [0, 1]}


def test_plain_is_added_and_sweep_appends_clasp_methods():
    methods = parse_methods("clasp", sweep_skip=(4, 12))
    assert [m.name for m in methods] == ["plain", "clasp", "clasp-skip4", "clasp-skip12"]
    assert methods[3].speculative_config == {"method": "clasp", "clasp_skip_layers": 12}


@pytest.mark.parametrize("spec, match", [
    ('x={"method": "clasp"', "invalid JSON"),
    ('x=[1, 2]', "object with a \"method\" key"),
    ('x={"num_speculative_tokens": 3}', "\"method\" key"),
    ("medusa", "unknown method"),
    ("clasp,clasp", "duplicate"),
])
def test_bad_methods(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_methods(spec)


def test_parse_int_list():
    assert parse_int_list("1, 8,32", "--batch-sizes", low=1) == (1, 8, 32)
    for bad in ("", "0", "a,b"):
        with pytest.raises(ValueError, match="--batch-sizes"):
            parse_int_list(bad, "--batch-sizes", low=1)


# --------------------------------------------------------------------------- arithmetic


def test_speedup_is_ratio_of_means_not_mean_of_ratios():
    assert speedup([10.0, 1.0], [5.0, 1.0]) == pytest.approx(5.5 / 3.0)  # not 1.5
    assert speedup([], [1.0]) is None
    assert speedup([1.0], []) is None


def test_acceptance_length_includes_bonus_token():
    assert acceptance_length(drafts=10, accepted=25) == pytest.approx(3.5)
    assert acceptance_length(drafts=0, accepted=0) is None
    # 100 tokens with 60 accepted drafts took 40 target passes (prefill included).
    assert tokens_per_step(100, 60) == pytest.approx(2.5)
    assert tokens_per_step(100, 0) == pytest.approx(1.0)


def test_identical_counting_and_first_difference():
    ref = {1: [1, 2, 3], 2: [4, 5], 3: [7]}
    got = {1: [1, 2, 3], 2: [4, 6], 4: [9]}
    assert count_identical(ref, got) == (1, 2, [2])
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 9, 3]) == 1
    assert first_difference([1, 2, 3], [1, 2]) == 2


# --------------------------------------------------------------------------- summary / report


def fake_run(batch_sizes=(1, 4), sweep=True):
    """Records and calls as `_measure` would produce them, with made-up timings."""
    questions = [Question(i, g, g, f"{g}?") for i, g in enumerate(["qa", "qa", "rag", "rag"])]
    methods = ["plain", "clasp", "ngram"] + (["clasp-skip4", "clasp-skip12"] if sweep else [])
    speed = {"plain": 10.0, "clasp": 15.0, "ngram": 12.0, "clasp-skip4": 11.0,
             "clasp-skip12": 16.0}
    records, calls = [], []
    for bs in batch_sizes:
        for start in range(0, len(questions), bs):
            qs = questions[start:start + bs]
            for m in methods:
                tokens = 20
                wall = tokens * len(qs) / (speed[m] * (1.5 if bs > 1 else 1.0))
                calls.append({
                    "method": m, "batch_size": bs, "round": 0, "batch_start": start,
                    "question_ids": [q.question_id for q in qs], "groups": [q.group for q in qs],
                    "wall_s": wall, "num_tokens": [tokens] * len(qs),
                    "drafts": 0 if m == "plain" else 4 * len(qs),
                    "draft_tokens": 0 if m == "plain" else 16 * len(qs),
                    "accepted": 0 if m == "plain" else 8 * len(qs),
                    "clasp": ({"search_time_s": 0.1 * wall, "draft_time_s": 0.3 * wall,
                               "num_dp_runs": 1, "skipped_layers": {"15": 4}}
                              if m.startswith("clasp") else None),
                })
                for q in qs:
                    ids = [1, 2, 4] if m == "ngram" and q.question_id == 0 else [1, 2, 3]
                    records.append({
                        "method": m, "batch_size": bs, "round": 0, "question_id": q.question_id,
                        "group": q.group, "category": q.category, "num_tokens": tokens,
                        "wall_s": wall, "tps": tokens / wall, "token_ids": ids, "text": "answer",
                        "identical": None if m == BASELINE else ids == [1, 2, 3],
                        "first_difference": None if m == BASELINE or ids == [1, 2, 3] else 2,
                    })
    return methods, records, calls


def fake_result(batch_sizes=(1, 4), sweep=True):
    methods, records, calls = fake_run(batch_sizes, sweep)
    groups = ["qa", "rag"]
    summary = summarize(records, calls, methods, groups, batch_sizes)
    specs = parse_methods(",".join(m for m in methods if not m.startswith("clasp-skip")),
                                sweep_skip=(4, 12) if sweep else ())
    return {
        "config": {"model": "/m", "categories": groups, "per_category": 2, "offset": 0,
                   "max_tokens": 20, "temperature": 0.0, "dtype": "float32", "rounds": 1,
                   "enforce_eager": True, "batch_sizes": list(batch_sizes),
                   "methods": [{"name": m.name, "speculative_config": m.speculative_config,
                                "sweep": m.name.startswith("clasp-skip"), "resolved": None}
                               for m in specs]},
        "machine": {"cpu_model": "test CPU", "cpus": 2, "iomp": {"in_ld_preload": True}},
        "num_prompts": 4, "summary": summary, "mismatches": mismatches(records, methods),
        "errors": [], "records": records, "calls": calls,
    }


def row(result, bs, group, method):
    return find_row(result["summary"], bs, group, method)


def test_summary_speedup_tau_identity_and_time_split():
    result = fake_result()
    clasp = row(result, 1, "overall", "clasp")
    assert clasp["mean_tps"] == pytest.approx(15.0)
    assert clasp["speedup"] == pytest.approx(1.5)
    assert clasp["tau"] == pytest.approx(3.0)  # 1 + 8/4
    assert clasp["identical"] == 4 and clasp["compared"] == 4
    assert clasp["clasp"]["dp_pct"] == pytest.approx(10.0)
    assert clasp["clasp"]["draft_pct"] == pytest.approx(30.0)
    assert clasp["clasp"]["other_pct"] == pytest.approx(60.0)
    assert row(result, 1, "overall", "plain")["tau"] == 1.0
    ngram = row(result, 1, "qa", "ngram")
    assert ngram["identical"] == 1 and ngram["compared"] == 2
    assert row(result, 4, "overall", "clasp")["batch_throughput_tps"] == pytest.approx(22.5)


def test_group_call_figures_use_pure_batches_only():
    result = fake_result(batch_sizes=(1, 4))
    mixed = row(result, 4, "qa", "clasp")  # the one batch of 4 mixes qa and rag
    assert mixed["num_prompts"] == 2 and mixed["mean_tps"] is not None
    assert mixed["calls"] == 0 and mixed["tau"] is None
    assert row(result, 4, "overall", "clasp")["tau"] == pytest.approx(3.0)


def test_mismatch_shares():
    mm = fake_result()["mismatches"]
    assert mm["clasp"]["differing"] == 0
    assert mm["ngram"]["differing"] == 2 and mm["ngram"]["compared"] == 8
    assert mm["ngram"]["share"] == pytest.approx(0.25)
    assert {p["batch_size"] for p in mm["ngram"]["prompts"]} == {1, 4}
    assert BASELINE not in mm


def test_report_and_files(tmp_path):
    result = fake_result()
    text = format_report(result)
    assert "batch size 1" in text and "batch size 4" in text
    assert "1.50x" in text and "ngram: 2/8 outputs differ" in text
    assert "clasp time split" in text
    assert "clasp vs ngram 1.25x (tokens/s per prompt, overall)" in text
    paths = write_results(result, tmp_path / "out")
    names = {p.name for p in paths}
    assert names == {"results.json", "speedup_by_group.png", "speedup_vs_batch_size.png",
                     "skip_sweep.png"}
    for p in paths:
        assert p.stat().st_size > 0
    loaded = json.loads((tmp_path / "out" / "results.json").read_text())
    assert loaded["summary"] == json.loads(json.dumps(result["summary"]))


def test_single_batch_size_without_sweep_writes_one_plot(tmp_path):
    paths = write_results(fake_result(batch_sizes=(1,), sweep=False), tmp_path)
    assert sorted(p.name for p in paths) == ["results.json", "speedup_by_group.png"]


def test_demo_summary_line():
    result = fake_result(batch_sizes=(1,), sweep=False)
    result["questions"] = [{"question_id": i, "group": g, "text": f"{g} question {i}"}
                           for i, g in enumerate(["qa", "qa", "rag", "rag"])]
    text = demo.summary(result, show=1)
    assert text.startswith("### [qa] qa question 0\nanswer\n")
    table = text.splitlines()[-3:]
    assert "(4 prompts, batch 1, greedy)" in text
    # Columns: tokens/s, vs plain, clasp vs this method, tau, identical to plain.
    assert table[0].split() == ["plain", "10.0", "1.00x", "1.50x", "1.00", "-"]
    assert table[1].split() == ["clasp", "15.0", "1.50x", "-", "3.00", "4/4"]
    assert table[2].split() == ["ngram", "12.0", "1.20x", "1.25x", "3.00", "3/4"]


# --------------------------------------------------------------------------- CLI


def test_cli_usage_errors_exit_2_without_engine(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench"]) == cli.EXIT_USAGE
    assert "--questions" in capsys.readouterr().err
    q = write_questions(tmp_path / "q.jsonl")
    assert cli.main(["bench", "--questions", str(q), "--methods", "x={bad"]) == cli.EXIT_USAGE
    assert "invalid JSON" in capsys.readouterr().err
    assert cli.main(["bench", "--questions", str(q), "--categories", "qa,nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert cli.main(["bench", "--questions", str(q), "--batch-sizes", "0"]) == 2


def test_no_reexec_outside_the_cli(monkeypatch):
    called = []
    monkeypatch.setattr(os, "execv", lambda *a: called.append(a))
    monkeypatch.delenv(cpu_env.IOMP_GUARD_ENV, raising=False)
    cpu_env.maybe_reexec_with_iomp(True)  # sys.argv[0] is pytest here
    assert not called


def test_subcommands_registered():
    assert {"bench", "demo"} <= set(cli.SUBCOMMANDS)
    parser = cli.build_parser()
    args = parser.parse_args(["bench", "--batch-sizes", "1,8", "--enforce-eager"])
    options = options_from_args(args)
    assert options.batch_sizes == (1, 8) and options.enforce_eager is True
    assert options_from_args(parser.parse_args(["bench"])).enforce_eager is False
    assert parser.parse_args(["demo"]).enforce_eager is True
    assert options.out.startswith("bench-results")
    assert isinstance(options.methods, str)  # parsed by run_bench


def _linux_cpu_with_iomp(monkeypatch, command: str) -> list:
    """A Linux x86 CPU machine whose venv ships libiomp5, running `vllm-clasp <command>`;
    returns the list os.execv calls are recorded in."""
    calls = []
    monkeypatch.setattr(os, "execv", lambda exe, argv: calls.append((exe, argv)))
    monkeypatch.setattr(cpu_env, "find_iomp", lambda: "/venv/lib/libiomp5.so")
    monkeypatch.setattr(cpu_env, "_on_cpu", lambda: True)
    monkeypatch.setattr(cpu_env.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu_env.sys, "platform", "linux")
    monkeypatch.setattr(cpu_env.sys, "argv", ["/venv/bin/vllm-clasp", command])
    return calls


def test_iomp_reexec_once_from_the_cli(monkeypatch):
    calls = _linux_cpu_with_iomp(monkeypatch, "bench")
    monkeypatch.setattr(cpu_env.sys, "orig_argv", ["python", "/venv/bin/vllm-clasp", "bench"])
    monkeypatch.setenv("LD_PRELOAD", "/x/libfoo.so")
    monkeypatch.delenv(cpu_env.IOMP_GUARD_ENV, raising=False)

    cpu_env.maybe_reexec_with_iomp(False)  # --no-iomp
    assert not calls and os.environ["LD_PRELOAD"] == "/x/libfoo.so"

    cpu_env.maybe_reexec_with_iomp(True)
    assert calls == [(cpu_env.sys.executable, [cpu_env.sys.executable, "/venv/bin/vllm-clasp",
                                             "bench"])]
    assert os.environ["LD_PRELOAD"] == "/venv/lib/libiomp5.so:/x/libfoo.so"
    assert os.environ[cpu_env.IOMP_GUARD_ENV] == "1"
    cpu_env.maybe_reexec_with_iomp(True)  # the re-executed process does not loop
    assert len(calls) == 1


def test_no_intel_openmp_when_gnu_openmp_is_preloaded(monkeypatch):
    """vLLM asserts that LD_PRELOAD does not hold both (OMPProcessManager): with libgomp
    already preloaded (by the user, or by vLLM in a parent process that ran an engine) the
    tools neither re-execute nor add libiomp5 for their engines."""
    calls = _linux_cpu_with_iomp(monkeypatch, "layers")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libgomp.so.1")
    monkeypatch.delenv(cpu_env.IOMP_GUARD_ENV, raising=False)
    cpu_env.maybe_reexec_with_iomp(True)
    info = cpu_env.setup_iomp(True)
    assert not calls and os.environ["LD_PRELOAD"] == "/usr/lib/libgomp.so.1"
    assert info["in_ld_preload"] is False


def test_memory_line_reports_extra_peak_vs_plain():
    from vllm_clasp.tools.report import _memory_lines

    result = {"engines": {"plain": {"memory": {"peak_rss_mib": 1000.0}},
                          "clasp": {"memory": {"peak_rss_mib": 1030.0}},
                          "ngram": {"memory": None}}}
    (line,) = _memory_lines(result, ["plain", "clasp", "ngram"])
    assert "plain 1000" in line and "clasp 1030 (+3.0%)" in line and "ngram" not in line
    assert _memory_lines({"engines": {}}, ["plain"]) == []


def test_builtin_clasp_layers_is_clasp_without_copied_drafts():
    methods = parse_methods("plain,clasp-layers")
    assert methods[1].speculative_config == {"method": "clasp", "clasp_copy_source": "none"}


# --------------------------------------------------------------------------- console


def test_logs_to_file_catches_this_process_and_its_children(tmp_path, capfd):
    import subprocess

    from vllm_clasp.tools.console import logs_to_file, tail

    log = tmp_path / "logs" / "demo.log"
    with logs_to_file(log) as console:
        os.write(1, b"to stdout\n")  # what vLLM's and torch's writes to fd 1 / 2 amount to
        os.write(2, b"to stderr\n")
        subprocess.run([sys.executable, "-c", "import sys; print('child out'); "
                        "print('child err', file=sys.stderr)"], check=True)
        print("for the person", file=console)
    os.write(1, b"after\n")
    text = log.read_text()
    for line in ("to stdout", "to stderr", "child out", "child err"):
        assert line in text
    assert "for the person" not in text
    out = capfd.readouterr().out
    assert "for the person" in out and "after" in out and "child out" not in out
    assert tail(log, 1) == "child err\n" or "child" in tail(log, 2)


def test_quiet_prints_the_log_tail_when_the_run_fails(tmp_path, monkeypatch, capfd):
    from vllm_clasp.tools.console import LOG_DIR_ENV, quiet

    monkeypatch.setenv(LOG_DIR_ENV, str(tmp_path))
    with pytest.raises(RuntimeError):
        with quiet("demo", verbose=False):
            os.write(1, b"vLLM said why\n")
            raise RuntimeError("engine failed")
    err = capfd.readouterr().err
    assert "vLLM's own logs go to" in err and "vLLM said why" in err
    with quiet("demo", verbose=True) as console:
        assert console is None


def test_a_run_with_failed_engines_shows_the_log_tail(tmp_path, monkeypatch, capfd):
    """bench/demo catch an engine that fails to start or generate and go on with the others;
    the log's last lines (vLLM's reason) still reach the terminal, and the result comes back."""
    from vllm_clasp.tools import bench, bench_cli
    from vllm_clasp.tools.console import LOG_DIR_ENV

    monkeypatch.setenv(LOG_DIR_ENV, str(tmp_path))

    def run_bench(options):
        os.write(2, b"ValueError: the reason vLLM gave\n")
        return {"errors": [{"method": "clasp", "phase": "build", "error": "boom"}]}

    monkeypatch.setattr(bench, "run_bench", run_bench)
    result = bench_cli.run_for_cli("bench", bench.BenchOptions(iomp=False), verbose=False)
    assert result["errors"][0]["method"] == "clasp"
    err = capfd.readouterr().err
    assert "failed; the last lines of" in err and "the reason vLLM gave" in err
    monkeypatch.setattr(bench, "run_bench", lambda options: {"errors": []})
    assert bench_cli.run_for_cli("bench", bench.BenchOptions(iomp=False), verbose=False) == {
        "errors": []}
    assert "the last lines of" not in capfd.readouterr().err


def test_recorded_config_leaves_the_console_out():
    import io
    import json

    from vllm_clasp.tools.bench import BenchOptions, _config

    config = _config(BenchOptions(console=io.StringIO(), batch_sizes=(1, 8)), "model", [],
                     ["qa"], {})
    assert "console" not in config and config["batch_sizes"] == (1, 8)
    json.dumps(config)


def test_prompts_use_the_chat_template_or_the_text_for_a_base_model():
    from vllm_clasp.tools.questions import chat_prompts
    from vllm_clasp.tools.questions import Question

    class Tokenizer:
        chat_template = None

        def __call__(self, text, add_special_tokens):
            return {"input_ids": [0] * (len(text.split()) + add_special_tokens)}

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return f"<user>{messages[0]['content']}</user><assistant>"

    questions = [Question("1", "qa", "qa", "two words"), Question("2", "qa", "qa", "x " * 50)]
    base = Tokenizer()
    kept, prompts, lengths = chat_prompts(base, questions, max_model_len=10)
    assert prompts == ["two words"] and lengths == [3] and kept == questions[:1]
    chat = Tokenizer()
    chat.chat_template = "{{ messages }}"
    _, prompts, _ = chat_prompts(chat, questions[:1], max_model_len=10)
    assert prompts == ["<user>two words</user><assistant>"]


def test_report_shows_the_repeat_scenario_apart_and_skipped_methods():
    result = fake_result(batch_sizes=(1,), sweep=False)
    faster = [dict(r, tps=2 * r["tps"]) if r["method"] == "ngram" else r
              for r in result["records"]]
    result["summary_repeat"] = summarize(faster, result["calls"], ["plain", "clasp", "ngram"],
                                         ["qa", "rag"], (1,))
    result["skipped_methods"] = {"suffix": "arctic-inference is not installed (pip ...)"}
    text = format_report(result)
    unseen, _, repeat = text.partition("REPEAT scenario")
    assert repeat, text
    assert "1.20x" in unseen and "2.40x" in repeat  # ngram: 12 vs 10 tokens/s, then doubled
    assert "suffix: skipped: arctic-inference is not installed" in text


def test_unavailable_methods_say_why(monkeypatch):
    from vllm_clasp.core import options
    from vllm_clasp.tools.methods import unavailable

    suffix, clasp = parse_methods("plain,suffix,clasp")[1:]
    assert unavailable(suffix) is None and unavailable(clasp) is None
    monkeypatch.setattr(options.draft_source, "available", lambda name: name != "suffix")
    assert "arctic-inference" in unavailable(suffix)
    assert unavailable(clasp) is None  # clasp falls back to n-gram copies


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_bench_requests_carry_no_seed(temperature):
    """A seeded request drafts by CLaSp's fixed policy, not what unseeded traffic gets: the
    first temperature-1 run with seed=0 per request measured that policy (0.74x plain)."""
    from vllm_clasp.tools.bench import BenchOptions, _sampling_params

    params = _sampling_params(BenchOptions(temperature=temperature, max_tokens=7))
    assert params.seed is None
    assert params.temperature == temperature and params.max_tokens == 7
