from open_mythos.hf import OpenMythosConfig  # noqa: F401  (pip install 'open-mythos[hf]')
