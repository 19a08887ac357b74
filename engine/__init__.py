# megatron's import-time torch.compile decorations wait for a first call (engine/megatron_jit.py);
# armed here so that it precedes every megatron import an engine module makes
from engine.megatron_jit import install as _install_megatron_import_hook

_install_megatron_import_hook()
