"""Dense CRF and CRF-with-alpha against SEAM's _crf_with_alpha vector."""
import builtins
import dataclasses

import numpy as np
import pytest

from tool.contract import crf_dir
from tool.crf import (DEEPLAB_TEST_CRF, SEED_CRF, crf_label, crf_with_alpha, dense_crf,
                      write_crf_dicts)
from tool.fileio import load_score_dict
from tests.reference_data import load_reference



@pytest.fixture(scope="module")
def ref():
    return load_reference("seam_cam_postproc.npz")


@pytest.fixture(scope="module")
def cam_dict(ref):
    return dict(zip(ref["cam_dict_keys"].tolist(), ref["cam_dict_values"]))


@pytest.mark.parametrize("alpha", [4, 24])
def test_crf_with_alpha_matches_seam(ref, cam_dict, alpha):
    crf = crf_with_alpha(ref["image"], cam_dict, alpha)
    assert list(crf) == ref[f"crf{alpha}_keys"].tolist()
    values = np.stack(list(crf.values()))
    assert values.dtype == np.float32
    np.testing.assert_allclose(values, ref[f"crf{alpha}_values"], atol=1e-5, rtol=0)


def test_dense_crf_shape_dtype_and_normalised(ref):
    probs = ref["bgcam4"]
    marginals = dense_crf(ref["image"], probs)
    assert marginals.shape == probs.shape and marginals.dtype == np.float32
    np.testing.assert_allclose(marginals.sum(0), 1.0, atol=1e-5)
    # Fewer iterations and the DeepLab preset give a different but still normalised result.
    one_step = dense_crf(ref["image"], probs, DEEPLAB_TEST_CRF)
    np.testing.assert_allclose(one_step.sum(0), 1.0, atol=1e-5)
    assert np.abs(one_step - marginals).max() > 1e-3


def test_dense_crf_accepts_read_only_image(ref):
    image = np.array(ref["image"])
    image.setflags(write=False)  # as np.asarray(PIL image) gives
    np.testing.assert_array_equal(dense_crf(image, ref["bgcam4"]), dense_crf(ref["image"], ref["bgcam4"]))


def test_presets():
    assert dataclasses.asdict(SEED_CRF) == dict(iterations=10, gauss_sxy=3, gauss_compat=3, bilateral_sxy=80,
                                                bilateral_srgb=13, bilateral_compat=10)
    assert DEEPLAB_TEST_CRF.iterations == 1 and DEEPLAB_TEST_CRF.bilateral_sxy == 32


def test_dense_crf_rejects_size_mismatch(ref):
    with pytest.raises(ValueError, match="28x35"):
        dense_crf(ref["image"], ref["bgcam4"][:, :, :35])


def test_crf_label_counts_match_reference(ref, cam_dict):
    label = crf_label(ref["image"], cam_dict, 24)
    assert label.dtype == np.uint8
    values, counts = np.unique(label, return_counts=True)
    assert dict(zip(values.tolist(), counts.tolist())) == {0: 495, 9: 149, 15: 273, 16: 91}


def test_crf_with_alpha_empty_dict_is_background(ref):
    crf = crf_with_alpha(ref["image"], {}, 4)
    assert list(crf) == [0] and np.all(crf[0] == 1.0)
    assert np.all(crf_label(ref["image"], {}, 4) == 0)


def test_write_crf_dicts(tmp_path, ref, cam_dict):
    out_crf = str(tmp_path / "crf")
    paths = write_crf_dicts(ref["image"], cam_dict, "img", out_crf, [4, 24])
    assert paths == [f"{crf_dir(out_crf, 4)}/img.npy", f"{crf_dir(out_crf, 24)}/img.npy"]
    loaded = load_score_dict(paths[1], 20, one_based=True)
    np.testing.assert_allclose(np.stack(list(loaded.values())), ref["crf24_values"], atol=1e-5, rtol=0)


def test_missing_pydensecrf_names_the_package(monkeypatch, ref):
    real_import = builtins.__import__

    def no_pydensecrf(name, *args, **kwargs):
        if name.startswith("pydensecrf"):
            raise ImportError("No module named 'pydensecrf'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pydensecrf)
    with pytest.raises(ImportError, match="pydensecrf2"):
        dense_crf(ref["image"], ref["bgcam4"])
