from open_mythos.hf import OpenMythosForCausalLM  # noqa: F401  (pip install 'open-mythos[hf]')
