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
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["a", "bc"]


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
    assert "prefill_batch must be an int in [1, max_batch=4]" in capsys.readouterr().err
