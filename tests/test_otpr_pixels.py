"""otpr_pixels.py's own parts: the ResNet-18 encoder, its torchvision weights, spatial softmax, random shifts, the
replay buffer's features, the actor's minibatches and loss, and the decisions cut from a pixel dataset."""
import numpy as np
import pytest
import torch

import otpr_pixels as op

# torchvision's names for ResNet-18's 20 convolutions (torchvision.models.resnet18().state_dict(), 4-d entries)
TORCHVISION_CONVOLUTIONS = (
    ["conv1.weight"]
    + [f"layer{layer}.{block}.conv{conv}.weight" for layer in range(1, 5) for block in (0, 1) for conv in (1, 2)]
    + [f"layer{layer}.0.downsample.0.weight" for layer in (2, 3, 4)]
)


def torchvision_format_state_dict(seed: int) -> dict:
    """A state dict laid out as torchvision's resnet18 one: convolutions, batch norms with statistics, classifier."""
    generator = torch.Generator().manual_seed(seed)
    reference = op.ResNet18()
    state = {name: torch.randn(value.shape, generator=generator) for name, value in reference.state_dict().items()
             if value.ndim == 4}
    norms = ["bn1"] + [f"layer{l}.{b}.bn{c}" for l in range(1, 5) for b in (0, 1) for c in (1, 2)]
    norms += [f"layer{l}.0.downsample.1" for l in (2, 3, 4)]
    for norm in norms:
        channels = state[norm.replace("bn", "conv").replace("downsample.1", "downsample.0") + ".weight"].shape[0]
        state.update({f"{norm}.weight": torch.rand(channels), f"{norm}.bias": torch.rand(channels),
                      f"{norm}.running_mean": torch.rand(channels), f"{norm}.running_var": torch.rand(channels),
                      f"{norm}.num_batches_tracked": torch.tensor(7)})
    state.update({"fc.weight": torch.randn(1000, 512), "fc.bias": torch.randn(1000)})
    return state


def args(**overrides) -> op.Args:
    return op.Args(**overrides)


def test_resnet18_trunk_has_resnet18s_parameters_and_output_size():
    trunk = op.ResNet18()
    # torchvision's resnet18 has 11,689,512 parameters, of which the 512 x 1000 classifier holds 513,000; group norm
    # has as many affine parameters as batch norm
    assert sum(p.numel() for p in trunk.parameters()) == 11_689_512 - 513_000
    assert trunk(torch.zeros(2, 3, 84, 84)).shape == (2, 512, 3, 3)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in trunk.modules())
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in trunk.modules()) == 20


def test_trunk_convolutions_carry_torchvisions_names():
    names = [name for name, value in op.ResNet18().state_dict().items() if value.ndim == 4]
    assert sorted(names) == sorted(TORCHVISION_CONVOLUTIONS)


def test_torchvision_weights_load_into_the_convolutions_only(tmp_path):
    state = torchvision_format_state_dict(seed=0)
    torch.save(state, tmp_path / "resnet18.pth")
    trunk = op.ResNet18()
    norms_before = {k: v.clone() for k, v in trunk.state_dict().items() if "norm" in k or "downsample.1" in k}
    op.load_torchvision_weights(trunk, str(tmp_path / "resnet18.pth"))
    loaded = trunk.state_dict()
    for name in TORCHVISION_CONVOLUTIONS:
        torch.testing.assert_close(loaded[name], state[name], rtol=0, atol=0)
    for name, value in norms_before.items():  # group norms keep their identity start
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0)


def test_encoder_weights_of_another_network_are_refused(tmp_path):
    state = torchvision_format_state_dict(seed=0)
    del state["layer3.1.conv2.weight"]
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="not a torchvision ResNet-18 state dict.*layer3.1.conv2.weight"):
        op.load_torchvision_weights(op.ResNet18(), str(tmp_path / "missing.pth"))
    state = torchvision_format_state_dict(seed=0)
    state["conv1.weight"] = torch.zeros(64, 1, 7, 7)  # a grey-scale first layer
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match="conv1.weight"):
        op.load_torchvision_weights(op.ResNet18(), str(tmp_path / "shape.pth"))
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read"):
        op.load_torchvision_weights(op.ResNet18(), str(tmp_path / "text.pth"))
    with pytest.raises(FileNotFoundError):
        op.load_torchvision_weights(op.ResNet18(), str(tmp_path / "absent.pth"))


def test_spatial_softmax_returns_the_peaks_column_then_row_in_minus_one_to_one():
    softmax = op.SpatialSoftmax(channels=1, num_keypoints=1)
    with torch.no_grad():
        softmax.keypoint_maps.weight.fill_(1.0)
        softmax.keypoint_maps.bias.zero_()
    maps = torch.zeros(1, 1, 3, 5)
    maps[0, 0, 0, 4] = 100.0  # top row, rightmost column
    torch.testing.assert_close(softmax(maps), torch.tensor([[1.0, -1.0]]))
    maps = torch.zeros(1, 1, 3, 5)
    maps[0, 0, 2, 1] = 100.0  # bottom row, second column
    torch.testing.assert_close(softmax(maps), torch.tensor([[-0.5, 1.0]]))


def test_random_shift_crops_the_padded_image_at_a_random_offset_per_image():
    torch.manual_seed(0)
    images = torch.arange(64 * 2 * 6 * 7, dtype=torch.float32).view(64, 2, 6, 7)
    shifted = op.random_shift(images, pad=2)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2), mode="replicate")
    offsets = []
    for image, crop in zip(padded, shifted):
        matches = [(dy, dx) for dy in range(5) for dx in range(5) if torch.equal(image[:, dy : dy + 6, dx : dx + 7], crop)]
        assert len(matches) == 1  # both channels moved together, by one offset within [0, 2 pad]
        offsets.append(matches[0])
    assert len(set(offsets)) > 10  # each image has its own offset
    assert torch.equal(op.random_shift(images, pad=0), images)


def test_encoder_features_are_each_cameras_keypoints_then_the_state():
    encoder = op.Encoder((2, 3, 84, 84), state_dim=9, args=args(encoder_keypoints=8))
    assert encoder.feature_dim == 2 * 16 + 9
    pixels = torch.randint(256, (3, 2, 3, 84, 84), dtype=torch.uint8)
    state = torch.randn(3, 9)
    features = encoder(pixels, state)
    assert features.shape == (3, 41)
    assert torch.equal(features[:, -9:], state)
    assert features[:, :-9].abs().max() <= 1  # keypoint coordinates
    # the second camera's keypoints come from the second image: changing it changes only them
    other = pixels.clone()
    other[:, 1] = 255 - other[:, 1]
    changed = (encoder(other, state) - features).abs() > 1e-6
    assert not changed[:, :16].any() and changed[:, 16:32].any()
    torch.manual_seed(0)
    assert not torch.allclose(encoder(pixels, state, augment=True), features)  # training sees shifted images
    assert torch.equal(encoder(pixels, state), features)  # acting does not


class MeanEncoder(torch.nn.Module):
    """A stand-in encoder: the mean of each observation's image, then its state."""

    def forward(self, pixels, state, augment=False):
        return torch.cat([pixels.float().flatten(1).mean(1, keepdim=True), state], dim=-1)


def filled_buffer(size: int = 50, capacity: int = 64):
    replay = op.ReplayBuffer(capacity, (1, 3, 4, 4), 2, 3, MeanEncoder(), "cpu")
    generator = torch.Generator().manual_seed(0)
    replay.add({
        "state": torch.randn(size, 2, generator=generator),
        "pixels": torch.randint(256, (size, 1, 3, 4, 4), generator=generator, dtype=torch.uint8),
        "actions": torch.randn(size, 3, generator=generator),
        "rewards": torch.randn(size, generator=generator),
        "next_state": torch.randn(size, 2, generator=generator),
        "next_pixels": torch.randint(256, (size, 1, 3, 4, 4), generator=generator, dtype=torch.uint8),
        "terminated": torch.zeros(size),
    })
    return replay


def test_replay_hands_out_the_features_of_each_rows_observation_and_next_observation():
    replay = filled_buffer()
    idx = torch.tensor([3, 3, 7, 49])
    rows = replay.rows(idx, ("obs", "next_obs", "actions", "pixels"))
    data = replay.data
    torch.testing.assert_close(rows["obs"], MeanEncoder()(data["pixels"][idx], data["state"][idx]))
    torch.testing.assert_close(rows["next_obs"], MeanEncoder()(data["next_pixels"][idx], data["next_state"][idx]))
    assert torch.equal(rows["actions"], data["actions"][idx]) and rows["pixels"].dtype == torch.uint8
    many = torch.randint(50, (9000,))  # encoded in slices of 4096
    torch.testing.assert_close(replay.features(many, ""), MeanEncoder()(data["pixels"][many], data["state"][many]))
    assert not replay.sample(8)["obs"].requires_grad


def test_plan_minibatch_pairs_state_i_with_action_j_and_weighs_the_same_pair():
    replay = filled_buffer()
    weigh = lambda obs, actions: obs[..., 0] * 1000 + actions[..., 0]  # identifies the pair
    config = args(actor_objective="plan", actor_batch_size=9)
    (obs, actions, weights), = op.actor_minibatches(None, None, replay, weigh, config, num_updates=1)
    assert obs["pixels"].shape == (9, 1, 3, 4, 4) and actions.shape == (9, 3)
    features = MeanEncoder()(obs["pixels"], obs["state"])
    torch.testing.assert_close(weights, features[:, 0] * 1000 + actions[:, 0])
    assert torch.equal(obs["state"][0], obs["state"][2]) and torch.equal(actions[0], actions[3])  # row i * 3 + j


def test_aligned_minibatches_weigh_the_rows_they_hand_out():
    replay = filled_buffer()
    weigh = lambda obs, actions: obs[..., 0] * 1000 + actions[..., 0]
    config = args(actor_objective="aligned", actor_batch_size=16)
    batches = list(op.actor_minibatches(None, None, replay, weigh, config, num_updates=3))
    assert len(batches) == 3
    for obs, actions, weights in batches:
        torch.testing.assert_close(weights, MeanEncoder()(obs["pixels"], obs["state"])[:, 0] * 1000 + actions[:, 0])


def test_resampled_minibatch_samples_from_policy_features_and_weighs_with_the_critics():
    replay = filled_buffer()
    encode = lambda pixels, state: (state * 10, state * 100)  # policy features, critic features: told apart by scale
    seen = {}

    def sample(obs):
        seen["sampled"] = obs
        return obs[:, :1].expand(-1, 3) + torch.arange(3.0)

    def weigh(obs, actions):
        seen["weighed"] = obs
        return torch.ones(actions.shape[:-1])

    config = args(actor_objective="resampled", actor_batch_size=5, num_candidates=2)
    (obs, actions, weights), = op.actor_minibatches(sample, encode, replay, weigh, config, num_updates=1)
    torch.testing.assert_close(seen["sampled"], (obs["state"] * 10).repeat_interleave(2, 0))
    torch.testing.assert_close(seen["weighed"], (obs["state"] * 100)[:, None].expand(-1, 2, -1))
    torch.testing.assert_close(actions, obs["state"][:, :1] * 10 + torch.arange(3.0))
    assert weights is None


def test_policy_and_critic_features_share_one_pass_or_use_each_encoder():
    calls = []
    policy_encoder = lambda pixels, state: calls.append("policy") or state + 1
    critic_encoder = lambda pixels, state: calls.append("critic") or state + 2
    state = torch.zeros(3, 2)
    obs, critic_obs = op.policy_and_critic_features(policy_encoder, policy_encoder, None, state)
    assert critic_obs is obs and calls == ["policy"]
    obs, critic_obs = op.policy_and_critic_features(policy_encoder, critic_encoder, None, state)
    assert torch.equal(obs, state + 1) and torch.equal(critic_obs, state + 2)


def critic_parts(feature_dim: int, action_dim: int, encoder=None):
    torch.manual_seed(0)
    qf, vf = op.TwinQ(feature_dim, action_dim, (16, 16)), op.mlp(feature_dim, (16, 16), 1)
    encoder_parameters = [] if encoder is None else [{"params": encoder.parameters(), "lr": 1e-2}]
    return dict(qf=qf, qf_target=op.TwinQ(feature_dim, action_dim, (16, 16)).requires_grad_(False), vf=vf,
                q_optimizer=torch.optim.Adam([{"params": qf.parameters()}, *encoder_parameters], lr=1e-3),
                v_optimizer=torch.optim.Adam(vf.parameters(), lr=1e-3))


def test_critics_own_encoder_is_trained_by_the_q_loss_on_the_features_the_shared_update_reads():
    torch.manual_seed(0)
    config = args(encoder_keypoints=2, random_shift=0)  # without shifts both updates see the same features
    encoder = op.Encoder((1, 3, 64, 64), 2, config)
    replay = op.ReplayBuffer(16, (1, 3, 64, 64), 2, 3, encoder, "cpu")
    replay.add({"state": torch.randn(8, 2), "pixels": torch.randint(256, (8, 1, 3, 64, 64), dtype=torch.uint8),
                "actions": torch.randn(8, 3), "rewards": torch.randn(8), "next_state": torch.randn(8, 2),
                "next_pixels": torch.randint(256, (8, 1, 3, 64, 64), dtype=torch.uint8), "terminated": torch.zeros(8)})
    batch = replay.rows(torch.arange(8), ("obs", "pixels", "state", "actions", "rewards", "next_obs", "terminated"))
    shared = op.update_critics({k: v for k, v in batch.items() if k not in ("pixels", "state")},
                               **critic_parts(encoder.feature_dim, 3), args=config)
    first_convolution = encoder.trunk.conv1.weight.detach().clone()
    own = op.update_critics({k: v for k, v in batch.items() if k != "obs"},
                            **critic_parts(encoder.feature_dim, 3, encoder), args=config, critic_encoder=encoder)
    for key in ("q_loss", "v_loss", "q_values"):
        torch.testing.assert_close(own[key], shared[key])
    assert not torch.equal(encoder.trunk.conv1.weight, first_convolution)  # the Q loss reached the encoder


def test_actor_loss_trains_the_encoder_and_matches_the_keypoints_own_actions():
    torch.manual_seed(0)
    config = args(encoder_keypoints=4, actor_hidden=(32, 32, 32), denoising_steps=4, num_keypoints=2, ot_batch_size=6)
    policy = op.DiffusionPolicy((1, 3, 64, 64), 2, 8, config)
    keypoints = (torch.randint(256, (2, 1, 3, 64, 64), dtype=torch.uint8), torch.randn(2, 2), torch.randn(2, 8))
    transport_cost = op.TransportCost(*keypoints, policy.encoder.feature_dim, config)
    obs = {"pixels": torch.randint(256, (6, 1, 3, 64, 64), dtype=torch.uint8), "state": torch.randn(6, 2)}
    seen = []
    policy.loss = lambda actions, features: seen.append((actions, features)) or features.sum(-1) * 0 + actions.sum(-1)
    loss, _ = op.actor_loss(policy, obs, torch.randn(6, 8), torch.ones(6), transport_cost, config)
    actions, features = seen[0]
    assert features.shape == (8, policy.encoder.feature_dim)  # 6 replay pairs, then the 2 keypoints
    torch.testing.assert_close(features[6:, -2:], keypoints[1])
    torch.testing.assert_close(actions[6:], keypoints[2])
    del policy.loss
    policy.zero_grad()
    op.actor_loss(policy, obs, torch.randn(6, 8), torch.ones(6), transport_cost, config)[0].backward()
    assert policy.encoder.trunk.conv1.weight.grad.abs().sum() > 0
    assert loss.shape == ()


def test_keypoint_features_follow_the_encoder():
    torch.manual_seed(0)
    config = args(encoder_keypoints=4, num_keypoints=3)
    encoder = op.Encoder((1, 3, 64, 64), 2, config)
    keypoints = (torch.randint(256, (3, 1, 3, 64, 64), dtype=torch.uint8), torch.randn(3, 2), torch.randn(3, 8))
    transport_cost = op.TransportCost(*keypoints, encoder.feature_dim, config)
    transport_cost.encode_keypoints(encoder)
    torch.testing.assert_close(transport_cost.keypoint_obs, encoder(keypoints[0], keypoints[1]))


def test_decisions_carry_the_images_of_their_first_and_next_states():
    steps = 7
    dataset = {
        "observations": np.arange(steps * 2, dtype=np.float32).reshape(steps, 2),
        "pixels": np.arange(steps * 5 * 4 * 3, dtype=np.uint8).reshape(steps, 1, 5, 4, 3),  # (N, cameras, H, W, 3)
        "actions": np.ones((steps, 3), dtype=np.float32),
        "rewards": np.zeros(steps, dtype=np.float32),
        "terminals": np.zeros(steps, dtype=bool),
        "timeouts": np.eye(1, steps, steps - 1, dtype=bool)[0],
    }
    chunks = op.make_chunk_transitions(dataset, chunk_size=2)
    assert chunks["pixels"].shape == (5, 1, 3, 5, 4) and chunks["pixels"].dtype == torch.uint8
    for t in range(5):
        assert torch.equal(chunks["pixels"][t, 0], torch.as_tensor(dataset["pixels"][t, 0]).permute(2, 0, 1))
        assert torch.equal(chunks["next_pixels"][t, 0], torch.as_tensor(dataset["pixels"][t + 2, 0]).permute(2, 0, 1))
        assert torch.equal(chunks["next_state"][t], torch.as_tensor(dataset["observations"][t + 2]))
