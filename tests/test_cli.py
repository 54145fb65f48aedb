import pytest
import torch

from open_mythos.cli import main


def test_demo_runs(capsys):
    assert main(["demo", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "rho(A)" in out and "n_loops= 8" in out


def test_variants_table(capsys):
    assert main(["variants"]) == 0
    assert "mythos_1t" in capsys.readouterr().out


def test_generate_streams_a_saved_model_and_reports_depths(tmp_path, capsys):
    import json

    import torch

    from open_mythos import OpenMythos
    from open_mythos.cli import demo_config
    from open_mythos.tokenizer import ByteTokenizer, save_tokenizer_name

    torch.manual_seed(0)
    model = OpenMythos(demo_config())
    model.save_pretrained(tmp_path)
    save_tokenizer_name(tmp_path, "byte")
    args = ["generate", "--model", str(tmp_path), "--max-new-tokens", "12", "--temperature", "0", "--n-loops", "3"]
    assert main([*args, "--prompt", "To be"]) == 0
    out, err = capsys.readouterr()
    ids = model.generate(torch.tensor([ByteTokenizer().encode("To be")]), 12, 3, temperature=0)[0, 5:].tolist()
    expected = "To be" + ByteTokenizer().decode([i for i in ids if i != 256])
    assert out.rstrip("\n") == expected.split("<|endoftext|>")[0]
    assert "loop depth histogram {3:" in err
    assert main([*args, "--prompt", "a", "--prompt", "bc", "--exit", "kl"]) == 0
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in rows] == ["a", "bc"] and "never trained" not in err
    assert main([*args, "--prompt", "a", "--exit", "act"]) == 0  # the unit as initialised: w = 0
    assert "ACT halting unit was never trained" in capsys.readouterr().err
    with torch.no_grad():
        model.recurrent.act.proj.weight[0, 0] = 0.1
    model.save_pretrained(tmp_path)
    assert main([*args, "--prompt", "a", "--exit", "act"]) == 0
    assert "never trained" not in capsys.readouterr().err


def test_generate_bad_input_is_a_clear_error(capsys):
    assert main(["generate", "--demo", "--prompt", ""]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    assert main(["generate", "--demo", "--prompt", "x", "--max-new-tokens", "1000"]) == 2
    assert "max_output_tokens" in capsys.readouterr().err
    assert main(["generate", "--prompt", "x"]) == 2
    assert "--model" in capsys.readouterr().err


def test_serve_passes_engine_settings_and_rejects_bad_ones(monkeypatch, capsys):
    import types

    import open_mythos.serving as serving

    built = {}
    monkeypatch.setattr(serving, "make_server", lambda app, *a, **kw: types.SimpleNamespace(run=lambda: None))
    monkeypatch.setattr(serving, "build_app", lambda engine, *a, **kw: built.setdefault("engine", engine))
    args = ["serve", "--demo", "--schedule", "depth", "--max-batch", "4"]
    assert main([*args, "--sync-every", "2", "--prefill-batch", "3"]) == 0
    engine = built["engine"]
    assert (engine.schedule, engine.sync_every, engine.prefill_batch, engine.max_batch) == ("depth", 2, 3, 4)
    assert main([*args, "--prefill-batch", "5"]) == 2
    assert "prefill_batch 5 is out of range [1, max_batch=4]" in capsys.readouterr().err


# ------------------------------------------------------------------ common mistakes: one line, exit 2
def one_line_error(capsys, argv: list[str]) -> str:
    """Run ``mythos argv``; require exit 2, nothing on stdout and one ``mythos: error:`` line on stderr."""
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("mythos: error: ") and err.count("\n") == 1, (out, err)
    return err


def test_missing_model_dir_is_one_line(tmp_path, capsys, monkeypatch):
    import open_mythos.serving as serving
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: pytest.fail("served a missing model"))
    for command in ("generate", "serve"):
        err = one_line_error(capsys, [command, "--model", str(tmp_path / "nope")])
        assert f"{tmp_path / 'nope'}" in err and "save_pretrained" in err
    assert serving  # imported: the [serve] extra is installed in this environment


def test_a_misspelt_config_key_gets_the_nearest_names(tmp_path, capsys):
    base = ["train", "--preset", "shakespeare-tiny", "--set", f"out_dir='{tmp_path}/run'"]
    err = one_line_error(capsys, [*base, "--set", "stepz=5"])
    assert "stepz" in err and "did you mean steps?" in err
    err = one_line_error(capsys, [*base, "--set", "model.dimm=64"])
    assert "[model]: dimm" in err and "did you mean dim?" in err
    err = one_line_error(capsys, [*base, "--set", "zzzz=1"])
    assert "did you mean" not in err


def test_a_run_directory_given_as_the_model_points_to_its_model(tmp_path, capsys):
    """``--model runs/NAME`` (the run, not its ``model/``) is the likely slip after ``mythos train``: the error
    names the directory to pass instead."""
    from open_mythos import OpenMythos
    from open_mythos.cli import demo_config

    OpenMythos(demo_config()).save_pretrained(tmp_path / "run" / "model")
    err = one_line_error(capsys, ["generate", "--model", str(tmp_path / "run"), "--prompt", "a"])
    assert f"--model {tmp_path / 'run' / 'model'}" in err
    err = one_line_error(capsys, ["generate", "--model", str(tmp_path / "nope"), "--prompt", "a"])
    assert "--model" not in err


def test_train_mistakes_are_one_line_before_training(tmp_path, capsys):
    err = one_line_error(capsys, ["train"])
    assert "--preset NAME" in err and "shakespeare-tiny" in err
    base = ["train", "--preset", "shakespeare-tiny", "--set", f"out_dir='{tmp_path}/run'"]
    err = one_line_error(capsys, [*base, "--set", "data.path=nope/"])
    assert "data.path" in err and "data.source=files" in err
    err = one_line_error(capsys, [*base, "--set", "data.source=files", "--set", "data.path=nope/"])
    assert "'nope'" in err and "data.path" in err
    assert "steps must be >= 1" in one_line_error(capsys, [*base, "--set", "steps=0"])
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_override_mistakes_a_user_makes_are_one_line(tmp_path, capsys):
    """A dotted key under a plain field (``steps.x=5``) used to raise TypeError with a traceback; an empty key
    named nothing; ``data.task_args`` with a source other than ``task`` was silently ignored (a full run)."""
    base = ["train", "--preset", "shakespeare-tiny", "--set", f"out_dir='{tmp_path}/run'"]
    err = one_line_error(capsys, [*base, "--set", "steps.x=5"])
    assert "steps.x" in err and "'steps'" in err
    err = one_line_error(capsys, [*base, "--set", "=5"])
    assert "'=5'" in err and "key=value" in err
    err = one_line_error(capsys, [*base, "--set", "data.task_args.hops=3"])
    assert "data.task_args" in err and "data.source" in err and "task" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_an_output_path_that_is_a_file_is_one_line(tmp_path, capsys):
    """--out / out_dir naming an existing file: one line naming it (they were FileExistsError / NotADirectoryError
    tracebacks)."""
    taken = tmp_path / "taken"
    taken.write_text("")
    assert str(taken) in one_line_error(capsys, ["experiment", "p-hop", "--out", str(taken), "--no-progress"])
    assert main(["train", "--preset", "shakespeare-tiny", "--no-progress", "--set", f"out_dir='{taken}'"]) == 2
    assert f"mythos: error: [Errno 17] File exists: '{taken}'\n" in capsys.readouterr().err


def test_a_device_this_machine_lacks_is_one_line(tmp_path, capsys):
    """--device / device naming a device torch does not know, or CUDA where torch has none: one line naming the
    argument (they were 'Torch not compiled with CUDA enabled' AssertionError / RuntimeError tracebacks)."""
    bad = ["nope"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in bad:
        assert "--device" in one_line_error(capsys, ["generate", "--demo", "--prompt", "hi", "--device", device])
        assert main(["train", "--preset", "shakespeare-tiny", "--no-progress", "--set", f"device='{device}'",
                     "--set", f"out_dir='{tmp_path}'"]) == 2
        assert "device must be a torch device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_train_help_lists_the_presets(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for name in ("shakespeare-tiny", "shakespeare-100m", "3b_fine_web_edu"):
        assert f"  {name}" in out


@pytest.mark.parametrize("name", ["khop", "prefix-sums", "loops", "dense-vs-looped"])
def test_experiment_bad_settings_are_one_line(name, tmp_path, capsys):
    base = ["experiment", name, "--out", str(tmp_path), "--no-progress", "--set"]
    assert "steps must be" in one_line_error(capsys, [*base, "steps=abc"])
    assert "steps must be >= 1" in one_line_error(capsys, [*base, "steps=0"])
    rows = ["experiment", name, "--out", str(tmp_path), "--no-progress", "--rows", "a"]
    assert "--rows applies to ablate only" in one_line_error(capsys, rows)  # was ignored: the run started
    assert list(tmp_path.iterdir()) == []  # nothing ran


def test_missing_extra_names_the_install_command(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ModuleNotFoundError
    err = one_line_error(capsys, ["train", "--preset", "shakespeare-tiny", "--set", "data.source='hf'"])
    assert "datasets" in err and "pip install -e '.[data]'" in err
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    err = one_line_error(capsys, ["serve", "--demo"])
    assert "uvicorn" in err and "pip install -e '.[serve]'" in err


def test_hf_streaming_without_network_is_one_line(monkeypatch, capsys):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'HuggingFaceFW/fineweb-edu' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    err = one_line_error(capsys, ["train", "--preset", "shakespeare-tiny", "--set", "data.source='hf'"])
    assert "not reachable" in err and "data.source='shakespeare'" in err


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError):
        main(["--debug", "generate", "--model", str(tmp_path)])
    monkeypatch.setenv("MYTHOS_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        main(["generate", "--model", str(tmp_path)])


def test_generate_error_is_not_glued_to_the_prompt(capsys):
    err = one_line_error(capsys, ["generate", "--demo", "--n-loops", "0", "--prompt", "hi"])
    assert "--n-loops must be >= 1" in err
    err = one_line_error(capsys, ["generate", "--demo", "--prompt", "hi", "--max-new-tokens", "1000"])
    assert "max_output_tokens" in err
    # any n_loops >= 1 runs: the engine is sized to it, deeper than the demo model's 4 trained loops
    assert main(["generate", "--demo", "--n-loops", "8", "--prompt", "hi", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.startswith("hi")


def test_printable_escapes_control_bytes():
    from open_mythos.cli import printable

    assert printable("a\x1b[2Jb\x07\n\tc é") == "a\\x1b[2Jb\\x07\n\tc é"


def test_help_shows_every_option_with_help(capsys):
    """Every generate/serve/demo option has a help text."""
    from open_mythos.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in ("generate", "serve", "demo", "train", "experiment", "variants", "plot"):
        for action in sub.choices[name]._actions:
            assert action.help, f"mythos {name} {action.option_strings or action.dest} has no help"


def test_saved_weights_are_readable_like_the_rest(tmp_path):
    import os

    from open_mythos import OpenMythos
    from open_mythos.cli import demo_config

    OpenMythos(demo_config()).save_pretrained(tmp_path)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    umask = os.umask(0)
    os.umask(umask)
    assert modes["model.safetensors"] == modes["config.json"] == 0o666 & ~umask
