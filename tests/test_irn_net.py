"""IRN network: reference keys with aliases, forward, loss terms, gradients, one SGD step,
inference boundary, checkpoint loading (portable weights of reference/irn/README.md)."""
import hashlib
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from network.irn import (IRNet, boundary_training_terms, canonical_names, displacement_target,
                         inference_edge, pair_displacement, state_of_canonical)
from network.weights import load_for_inference
from tests.reference_data import load_reference, portable_value, reference_path
from tool.fileio import DataError
from tool.optim import make_sgd, parameter_groups
from tool.path_index import PathIndex, edge_to_affinity

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def keys():
    with open(reference_path("irn/irn_keys.json"), encoding="utf-8") as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def ref():
    return load_reference("irn/irn_forward.npz")


@pytest.fixture(scope="module")
def portable(keys):
    model = IRNet()
    state = model.state_dict()
    values = {entry["name"]: torch.from_numpy(np.asarray(portable_value(entry["name"], tuple(entry["shape"]))))
              for entry in keys["canonical"]}
    model.load_state_dict(state_of_canonical(model, values), strict=True)
    return model, values


def test_state_dict_keys_and_aliases_match_reference(keys):
    model = IRNet()
    state = model.state_dict()
    assert [(k, list(v.shape)) for k, v in state.items()] == \
        [(e["name"], e["shape"]) for e in keys["net_state_dict_full"]]
    assert canonical_names(model) == [e["name"] for e in keys["canonical"]]
    groups = {names[0]: names[1:] for names in model.alias_groups()}
    assert all(groups[e["name"]] == e["aliases"] for e in keys["canonical"])
    groups = parameter_groups(model, 0.1, 1e-4)
    assert [g["lr"] for g in groups] == [0.1, 1.0] and all(g["weight_decay"] == 1e-4 for g in groups)
    reference_groups = keys["param_groups"]
    assert [len(g["params"]) for g in groups] == [g["n_tensors"] for g in reference_groups]
    assert [sum(p.numel() for p in g["params"]) for g in groups] == [g["n_elements"] for g in reference_groups]


def test_portable_weights_digest(keys, portable):
    model, _ = portable
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in canonical_names(model):
        value = state[name]
        array = np.zeros((), np.float32) if name.endswith("num_batches_tracked") else value.numpy()
        digest.update(name.encode("utf-8") + np.ascontiguousarray(array, dtype=np.float32).tobytes())
    assert digest.hexdigest() == keys["portable_sha256"]


def test_training_forward_losses_and_gradients(ref, portable):
    model, _ = portable
    model.train()
    edge_out, dp_out = model(torch.from_numpy(ref["img"]))
    np.testing.assert_allclose(edge_out.detach().numpy(), ref["edge_out"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dp_out.detach().numpy(), ref["dp_out"], rtol=1e-4, atol=1e-4)
    index = PathIndex(10, 24, 24)
    aff = edge_to_affinity(torch.sigmoid(edge_out), index)
    np.testing.assert_allclose(aff.detach().numpy(), ref["aff"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(pair_displacement(dp_out, index).detach().numpy(), ref["pair_disp"],
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(displacement_target(index).numpy(), ref["disp_target"])
    labels = [torch.from_numpy(ref[f"aff_{name}_label"]) for name in ("bg_pos", "fg_pos", "neg")]
    terms = boundary_training_terms(edge_out, dp_out, index, *labels)
    names = ["bg_pos_aff", "fg_pos_aff", "pos_aff", "neg_aff", "dp_fg", "dp_bg", "total"]
    assert [str(k) for k in ref["loss_keys"]] == [n.replace("_aff", "_aff_loss").replace("dp_fg", "dp_fg_loss")
                                                  .replace("dp_bg", "dp_bg_loss").replace("total", "total_loss")
                                                  for n in names]
    np.testing.assert_allclose([terms[n].item() for n in names], ref["loss_values"], rtol=1e-4, atol=1e-5)
    model.zero_grad()
    terms["total"].backward()
    params = dict(model.named_parameters())
    for name in ("fc_edge6.weight", "fc_edge6.bias", "fc_edge1.0.weight", "fc_edge1.1.weight"):
        np.testing.assert_allclose(params[name].grad.numpy(), ref[f"grad_{name}"], rtol=1e-4, atol=1e-6)
    for name in ("fc_dp7.3.weight", "fc_dp7.1.bias", "fc_dp1.0.weight"):
        grad, expected = params[name].grad.numpy(), ref[f"grad_{name}"]
        np.testing.assert_allclose(grad, expected, rtol=1e-2, atol=2e-3 * np.abs(expected).max())
    assert model.resnet50.conv1.weight.grad is None
    model.eval()
    eval_dp = model(torch.from_numpy(ref["img"]))[1]
    np.testing.assert_allclose(eval_dp.detach().numpy(), ref["dp_out_eval"], rtol=1e-4, atol=1e-4)


def test_one_sgd_step_as_train_irn(ref, portable):
    """The reference's effective optimiser: lr 0.1 / 1.0, weight decay 1e-4, momentum 1e-4."""
    model, _ = portable  # parameters as loaded (the test before changes gradients only)
    model.mean_shift.running_mean.zero_()
    model.train()
    optimizer = make_sgd(parameter_groups(model, 0.1, 1e-4), momentum=1e-4)
    edge_out, dp_out = model(torch.from_numpy(ref["run_img"]))
    labels = [torch.from_numpy(ref[f"run_aff_{name}_label"]) for name in ("bg_pos", "fg_pos", "neg")]
    terms = boundary_training_terms(edge_out, dp_out, PathIndex(10, 24, 24), *labels)
    np.testing.assert_allclose(terms["total"].item(), float(ref["run_total_loss"]), rtol=1e-5)
    np.testing.assert_allclose([terms[n].item() for n in ("pos_aff", "neg_aff", "dp_fg", "dp_bg")],
                               ref["run_logged_values"], rtol=1e-5)
    optimizer.zero_grad()
    terms["total"].backward()
    optimizer.step()
    params = dict(model.named_parameters())
    for name in ("fc_edge6.weight", "fc_edge6.bias", "fc_edge1.0.weight", "fc_edge1.1.weight",
                 "fc_dp7.3.weight", "fc_dp7.1.bias", "fc_dp1.0.weight"):
        np.testing.assert_allclose(params[name].detach().numpy(), ref[f"run_after_{name}"], rtol=1e-4, atol=1e-5)


def test_inference_edge_pads_to_512(ref, portable):
    model, values = portable
    model.load_state_dict(state_of_canonical(model, values), strict=True)
    model.eval()
    with torch.no_grad():
        edge = inference_edge(model, torch.from_numpy(ref["inf_input"][:1]))
    np.testing.assert_allclose(edge.numpy(), ref["inf_edge"], rtol=1e-4, atol=1e-4)


def test_released_checkpoint_loads_strictly(tmp_path):
    model = IRNet(0.125)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_()
        model.mean_shift.running_mean.normal_()
    state = {name: value.clone() for name, value in model.state_dict().items()}
    # The reference saves its loss module: the path-index buffers of radius 10 come along.
    index = PathIndex(10, 24, 24)
    state.update({f"path_indices{k}": torch.from_numpy(p) for k, p in enumerate(index.path_indices)})
    state["disp_target"] = displacement_target(index)
    path = tmp_path / "res50_irn.pth"
    build = lambda width: IRNet(width)  # noqa: E731
    torch.save(state, path)
    loaded = load_for_inference(build, str(path), 0.125, torch.device("cpu"))
    got = loaded.state_dict()
    for name in ("resnet50.layer3.2.conv2.weight", "fc_dp7.4.running_mean", "edge_layers.5.bias"):
        np.testing.assert_array_equal(got[name].numpy(), state[name].numpy())
    assert got["stage4.0.2.conv2.weight"].data_ptr() == got["resnet50.layer3.2.conv2.weight"].data_ptr()
    assert got["dp_layers.6.4.running_mean"].data_ptr() == got["mean_shift.running_mean"].data_ptr()
    # Aliases that disagree are refused; a file with the canonical names only fills them in.
    bad = dict(state)
    bad["backbone.0.0.weight"] = bad["backbone.0.0.weight"] + 1
    torch.save(bad, path)
    with pytest.raises(DataError, match="differ"):
        load_for_inference(build, str(path), 0.125, torch.device("cpu"))
    torch.save({name: state[name] for name in canonical_names(model)}, path)
    loaded = load_for_inference(build, str(path), 0.125, torch.device("cpu"))
    np.testing.assert_array_equal(loaded.edge_layers[5].weight.detach().numpy(), state["fc_edge6.weight"].numpy())
    bad = dict(state)
    bad.pop("fc_edge6.weight"), bad.pop("edge_layers.5.weight")
    torch.save(bad, path)
    with pytest.raises(DataError, match="missing"):
        load_for_inference(build, str(path), 0.125, torch.device("cpu"))
