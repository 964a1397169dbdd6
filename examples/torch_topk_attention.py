"""Top-k attention as a layer in a PyTorch model (autograd through the engine, zero-copy DLPack).

Run: python examples/torch_topk_attention.py
"""
import torch

from topkattn.interop.torch import topk_attention


class TopkSelfAttention(torch.nn.Module):
    def __init__(self, dim, heads, topk):
        super().__init__()
        self.heads, self.topk = heads, topk
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, x, attention=None):  # x (B, T, C)
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, T, D)
        o = (attention or (lambda q, k, v: topk_attention(q, k, v, topk=self.topk, causal=True)))(q, k, v)
        return self.out(o.transpose(1, 2).reshape(B, T, C))


def masked_topk_reference(q, k, v, topk):
    """The same attention in plain torch: causal scores, keep each row's top-k, softmax."""
    T = q.shape[2]
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    keep = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, s.topk(topk, -1).indices, True)
    return torch.softmax(s.masked_fill(~keep, float("-inf")), -1) @ v


torch.manual_seed(0)
layer = TopkSelfAttention(dim=64, heads=4, topk=8).double()
x = torch.randn(2, 48, 64, dtype=torch.float64)

loss = layer(x).square().mean()
loss.backward()
grads = [p.grad.clone() for p in layer.parameters()]

layer.zero_grad()
ref = layer(x, attention=lambda q, k, v: masked_topk_reference(q, k, v, 8)).square().mean()
ref.backward()
err = max((a - p.grad).abs().max().item() for a, p in zip(grads, layer.parameters()))
assert abs(loss.item() - ref.item()) < 1e-12 and err < 1e-12, (loss.item(), ref.item(), err)
print(f"OK torch: loss {loss.item():.6f} (reference {ref.item():.6f}), max parameter-grad diff {err:.1e}")
