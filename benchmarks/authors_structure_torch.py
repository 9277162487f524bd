"""The released code's per-image test structure in PyTorch eager: the baseline for the fused JAX step.

    python benchmarks/authors_structure_torch.py --model paper --images 2     # dim 768, 10 blocks
    python benchmarks/authors_structure_torch.py --model small --images 3     # dim 256, 4 blocks
    python benchmarks/authors_structure_torch.py --model paper --device cuda --images 8

Per image, as the released code's valad.py does it (docs/method.md §6.5): the B4 backbone on 12 copies of each of four
images (test and reference, each normalised and unnormalised) = 48 passes at batch 1, the four
tapped maps resized to 14 x 14 and concatenated (272 channels); the ViT on the 24 masked maps
(12 masks x test/reference) one at a time (24 passes at batch 1); per-patch L2 errors; the code's
Sinkhorn loop (cosine cost, epsilon 0.1, tolerance 0.1); align-corners upsampling; scipy's
Gaussian filters (sigma 7, then 4) on the host. Random weights; masks are random (their cost is
negligible). The ViT block is BEiT's (q/v biases, relative position bias, layer scale), written here
for timing only: the JAX model's numerics are tested against the spec in tests/. Compare with
`benchmarks/scoring.py --channels 272 --backbone` (the fused step, same sizes) in one session.
Needs torch and efficientnet_pytorch (the test extra) or timm.
"""

import argparse
import time

import scipy.ndimage
import torch
import torch.nn.functional as F
from torch import nn

SIZES = {"paper": (768, 10, 12), "small": (256, 4, 8)}


class Block(nn.Module):
    def __init__(self, d, heads, mlp=4.0):
        super().__init__()
        self.h = heads
        self.norm1, self.norm2 = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(d)), nn.Parameter(torch.zeros(d))
        self.proj, self.fc1, self.fc2 = nn.Linear(d, d), nn.Linear(d, int(d * mlp)), nn.Linear(int(d * mlp), d)
        self.gamma_1, self.gamma_2 = nn.Parameter(0.1 * torch.ones(d)), nn.Parameter(0.1 * torch.ones(d))

    def forward(self, x, rel_bias):
        b, n, d = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        q, k, v = F.linear(self.norm1(x), self.qkv.weight, bias).reshape(b, n, 3, self.h, -1).permute(2, 0, 3, 1, 4)
        attn = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1) + rel_bias).softmax(-1)
        x = x + self.gamma_1 * self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))
        return x + self.gamma_2 * self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    def __init__(self, c, d, depth, heads, grid=14):
        super().__init__()
        self.input_proj, self.output_proj = nn.Linear(c, d), nn.Linear(d, c)
        self.mask_token, self.cls_token = nn.Parameter(0.02 * torch.randn(d)), nn.Parameter(0.02 * torch.randn(d))
        self.table = nn.Parameter(0.02 * torch.randn((2 * grid - 1) ** 2 + 3, heads))
        self.index = torch.randint(0, self.table.shape[0], (grid * grid + 1, grid * grid + 1))
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(depth))

    def forward(self, h, mask):  # h (B, 196, C), mask (B, 196) bool
        x = self.input_proj(h)
        w = mask.unsqueeze(-1).type_as(x)
        x = x * (1 - w) + self.mask_token * w
        x = torch.cat([self.cls_token.expand(x.shape[0], 1, -1), x], 1)
        rel_bias = self.table[self.index].permute(2, 0, 1).unsqueeze(0)
        for blk in self.blocks:
            x = blk(x, rel_bias)
        return self.output_proj(x[:, 1:])


def make_backbone(device):
    """A B4 returning the maps at strides 2, 4, 8, 16 (24 + 32 + 56 + 160 = 272 channels)."""
    try:
        from efficientnet_pytorch import EfficientNet

        net = EfficientNet.from_name("efficientnet-b4").to(device).eval()
        ends, s = {}, 2  # the last block at each stride (the stem has stride 2)
        for i, blk in enumerate(net._blocks):
            st = blk._block_args.stride
            s *= int(st[0] if isinstance(st, (list, tuple)) else st)
            if s in (2, 4, 8, 16):
                ends[s] = i

        def run(x):
            x = net._swish(net._bn0(net._conv_stem(x)))
            out = []
            for i, blk in enumerate(net._blocks[: ends[16] + 1]):
                x = blk(x)
                if i in ends.values():
                    out.append(x)
            return out

        return run
    except ImportError:
        import timm

        net = timm.create_model("efficientnet_b4", features_only=True, out_indices=(0, 1, 2, 3)).to(device).eval()
        return net


def code_sinkhorn(e_h, e_r, eps=0.1, max_iter=1000, tol=0.1):
    """The released code's models/Sinkhorn_distance.py (docs/method.md §6.6) on one image: cosine cost
    between N-vectors, AssDis per test patch."""
    c = 1 - F.cosine_similarity(e_h[:, None, :], e_r[None, :, :], dim=-1, eps=1e-8)
    n = c.shape[0]
    mu = torch.full((n,), 1.0 / n, device=c.device)
    u, v = torch.zeros_like(mu), torch.zeros_like(mu)
    for _ in range(max_iter):
        u_old = u
        u = eps * (torch.log(mu + 1e-8) - torch.logsumexp((-c + u[:, None] + v[None]) / eps, dim=1)) + u
        v = eps * (torch.log(mu + 1e-8) - torch.logsumexp((-c + u[:, None] + v[None]) / eps, dim=0)) + v
        if (u - u_old).abs().sum().item() < tol:
            break
    pi = torch.exp((-c + u[:, None] + v[None]) / eps)
    return (pi * c).sum(1)


@torch.no_grad()
def score_one_image(backbone, vit, img, ref, device):
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)

    def feat(x):
        maps = backbone(x)
        return torch.cat([F.interpolate(m, size=(14, 14), mode="bilinear", align_corners=True) for m in maps], 1)

    views = {}
    for name, x in (("in", (img - mean) / std), ("tgt", img), ("ref_in", (ref - mean) / std), ("ref_tgt", ref)):
        views[name] = [feat(x) for _ in range(12)][-1]  # the code runs the backbone on 12 copies of each
    tok = {k: v.flatten(2).transpose(1, 2) for k, v in views.items()}  # (1, 196, 272)
    masks = torch.rand(12, 1, 196, device=device) < 0.2
    errs = []
    for k in range(24):
        src, tgt = ("in", "tgt") if k < 12 else ("ref_in", "ref_tgt")
        pred = vit(tok[src], masks[k % 12])
        errs.append((pred - tok[tgt]).norm(dim=-1)[0])
    pd = torch.stack(errs, 1)  # (196, 24)
    e_h, e_r = pd[:, :12], pd[:, 12:]
    patch = 0.6 * 1e4 * code_sinkhorn(e_h, e_r) + 0.4 * e_h.mean(1)
    up = F.interpolate(patch.view(1, 1, 14, 14), size=(224, 224), mode="bilinear", align_corners=True)[0, 0]
    amap = scipy.ndimage.gaussian_filter(up.cpu().numpy(), sigma=7)
    score = float(amap.max())
    return scipy.ndimage.gaussian_filter(amap, sigma=4), score


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=list(SIZES), default="small")
    p.add_argument("--images", type=int, default=2, help="timed images (after one warm-up image)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    d, depth, heads = SIZES[a.model]
    backbone = make_backbone(a.device)
    vit = ViT(272, d, depth, heads).to(a.device).eval()
    imgs = torch.rand(a.images + 1, 2, 1, 3, 224, 224, device=a.device)
    score_one_image(backbone, vit, imgs[0, 0], imgs[0, 1], a.device)  # warm-up
    t = time.perf_counter()
    for i in range(1, a.images + 1):
        score_one_image(backbone, vit, imgs[i, 0], imgs[i, 1], a.device)
    per = (time.perf_counter() - t) / a.images
    print(
        f"authors' per-image structure, PyTorch {torch.__version__} eager on {a.device} "
        f"({torch.get_num_threads()} threads), model={a.model}: {per:.3f} s per image ({1 / per:.2f} images/s)"
    )


if __name__ == "__main__":
    main()
