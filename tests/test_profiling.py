"""The kernel-profile summary the benchmark writes (--kernel-profile): kernels land in the right kind."""
import types

from comfy_xdit_patch.tools import profiling


def _event(name, us, device="CUDA"):
    return types.SimpleNamespace(key=name, self_device_time_total=us, device_type=types.SimpleNamespace(name=device))


def test_kernels_are_summed_by_kind():
    events = [
        _event("nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_bias_TNN", 2000),
        _event("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16", 1000),
        _event("Memcpy PtoP (Device -> Device)", 500),
        _event("c10d::symmetric_memory::barrier_kernel", 100),
        _event("ncclDevKernel_SendRecv", 300),
        _event("void at::native::CatArrayBatchedCopy_vectorized", 400),
        _event("void at::native::vectorized_layer_norm_kernel", 250),
        _event("aten::addmm", 9999, device="CPU"),  # CPU-side ops are not GPU time
    ]
    kinds = profiling.summary(events)
    assert kinds == {"communication": 0.9, "attention": 1.0, "matmul": 2.0, "copies": 0.4, "other": 0.25,
                     "total": 4.55}
