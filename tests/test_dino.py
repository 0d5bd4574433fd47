"""DINO's decoder: look forward twice (the gradient path it promises, checked with autograd) and
denoising queries isolated from the matching queries by the attention mask."""

import copy

import torch
from torch import nn

from clockdistill.models.common import MLP, Memory
from clockdistill.models.denoising import contrastive_denoising_queries
from clockdistill.models.dino import DinoDecoder, look_forward_twice

D, LEVELS, LAYERS = 32, 2, 3


def _memory(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(6, 8), (3, 4)]
    n = sum(h * w for h, w in shapes)
    return Memory(
        memory=torch.randn(batch, n, D, generator=g),
        pos=torch.randn(batch, n, D, generator=g),
        padding_mask=torch.zeros(batch, n, dtype=torch.bool),
        spatial_shapes=shapes,
        valid_ratios=torch.ones(batch, LEVELS, 2),
    )


def _decoder_and_heads(seed=0):
    torch.manual_seed(seed)
    decoder = DinoDecoder(D, 64, 0.0, LEVELS, 4, 2, LAYERS).eval()
    head = MLP(D, D, 4, 3)
    nn.init.normal_(head.layers[-1].weight, std=0.1)  # not DINO's zero init: every head must move the box
    box_heads = [copy.deepcopy(head) for _ in range(LAYERS)]  # one per layer, so gradients can be told apart
    class_heads = [nn.Linear(D, 5) for _ in range(LAYERS)]
    return decoder, box_heads, class_heads


def test_a_layers_box_loss_reaches_the_previous_layers_box_head_and_no_further():
    decoder, box_heads, class_heads = _decoder_and_heads()
    g = torch.Generator().manual_seed(1)
    content, reference = torch.randn(2, 7, D, generator=g), 0.2 + 0.6 * torch.rand(2, 7, 4, generator=g)
    hidden, refs = decoder(content, reference, _memory(), box_heads)
    _, boxes = look_forward_twice(hidden, refs, class_heads, box_heads)
    assert len(boxes) == LAYERS and len(refs) == LAYERS + 1

    def grads_of(loss):
        for p in [*decoder.parameters(), *(p for h in box_heads for p in h.parameters())]:
            p.grad = None
        loss.backward(retain_graph=True)
        return [
            sum(float(p.grad.abs().sum()) if p.grad is not None else 0.0 for p in h.parameters()) for h in box_heads
        ]

    last = grads_of(boxes[2].sum())
    assert last[2] > 0 and last[1] > 0  # its own head, and (looking forward twice) layer 1's head
    assert last[0] == 0.0  # layer 1 got layer 0's box detached: no path further back
    middle = grads_of(boxes[1].sum())
    assert middle[1] > 0 and middle[0] > 0 and middle[2] == 0.0
    # the next layer's input is the detached box: the references a layer attends with carry no gradient
    assert not refs[0].requires_grad and all(r.requires_grad for r in refs[1:])


def test_denoising_queries_never_change_the_matching_queries_outputs():
    decoder, box_heads, class_heads = _decoder_and_heads(seed=2)
    g = torch.Generator().manual_seed(3)
    targets = [
        {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.2], [0.6, 0.5, 0.3, 0.1]])},
        {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
    ]
    nq = 5
    dn = contrastive_denoising_queries(targets, nn.Embedding(5, D), nq, 4, dn_number=2, generator=g)
    content, reference = torch.randn(2, nq, D, generator=g), 0.2 + 0.6 * torch.rand(2, nq, 4, generator=g)
    mem = _memory()
    with torch.no_grad():
        alone, _ = decoder(content, reference, mem, box_heads)
        both, _ = decoder(
            torch.cat([dn.content, content], 1),
            torch.cat([dn.reference.sigmoid(), reference], 1),
            mem,
            box_heads,
            attn_mask=dn.attn_mask,
        )
        unmasked, _ = decoder(
            torch.cat([dn.content, content], 1), torch.cat([dn.reference.sigmoid(), reference], 1), mem, box_heads
        )
    pad = dn.pad_size
    assert torch.allclose(both[-1][:, pad:], alone[-1], atol=1e-5)
    assert not torch.allclose(unmasked[-1][:, pad:], alone[-1], atol=1e-3)  # without the mask they would leak
