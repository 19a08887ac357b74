"""engine/cuda_env.py on a real card: the compute capability nvidia-smi reports (which decides
CUDA_DEVICE_MAX_CONNECTIONS for TP > 1 runs) is the one CUDA reports."""
import torch

from engine.cuda_env import nvidia_smi_capability, order_tp_launches


def test_nvidia_smi_reports_the_capability_cuda_does():
    major, minor = torch.cuda.get_device_capability(0)
    assert nvidia_smi_capability() == float(f"{major}.{minor}")


def test_a_tp_run_on_this_card_gets_the_setting_it_should():
    major, _ = torch.cuda.get_device_capability(0)
    environ = {}
    assert order_tp_launches(2, environ) == ("1" if major < 10 else None)
