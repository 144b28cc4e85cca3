"""IoU-balanced RoI sampler (LibraROIHeads) vs detectron2's random sampler, 2000
proposals x 20 boxes, alone and with the IoU matrix + matcher (20 x --repeats rounds)."""

from __future__ import annotations

import torch

from eapm.utils.benchmark import interleaved, make_sync

from . import register


@register("sampler")
def run(args, reporter) -> None:
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.roi_heads import StandardROIHeads, build_roi_heads
    from detectron2.structures import Boxes, pairwise_iou

    from eapm.utils.testing import repo_cfg

    sync = make_sync(args.device)
    # one thread: the per-image sampling ops are tiny, and on a shared machine OpenMP's
    # barriers between 2 threads cost more than the ops (medians jump to ~100 ms)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = repo_cfg("COCO-Detection/libra_rcnn_R_50_FPN_1x.yaml")
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 16  # the box head is not timed; keep it small
    shapes = {f"p{i}": ShapeSpec(channels=256, stride=2**i) for i in range(2, 7)}
    heads = build_roi_heads(cfg, shapes)

    g = torch.Generator().manual_seed(0)
    h, w, n_gt, n_prop = 800, 1333, 20, 2000
    xy = torch.rand(n_gt, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
    wh = 16 + torch.rand(n_gt, 2, generator=g) * 300
    gt = torch.cat([xy, xy + wh], 1)
    # half the proposals jittered around the GT boxes (positives, hard negatives),
    # half anywhere (easy negatives), like RPN proposals late in training
    jit = gt[torch.randint(0, n_gt, (n_prop // 2,), generator=g)]
    size = (jit[:, 2:] - jit[:, :2]).repeat(1, 2)
    jit = jit + torch.randn(n_prop // 2, 4, generator=g) * size * 0.25
    rxy = torch.rand(n_prop // 2, 2, generator=g) * torch.tensor([w, h])
    rnd = torch.cat([rxy, rxy + 16 + torch.rand(n_prop // 2, 2, generator=g) * 300], 1)
    props = torch.cat([jit, rnd])
    props = torch.stack(
        [
            props[:, [0, 2]].min(1).values,
            props[:, [1, 3]].min(1).values,
            props[:, [0, 2]].max(1).values,
            props[:, [1, 3]].max(1).values,
        ],
        1,
    )
    gt_boxes, prop_boxes = Boxes(gt.to(args.device)), Boxes(props.to(args.device))
    gt_classes = torch.randint(0, 80, (n_gt,), generator=g).to(args.device)

    matched_idxs, matched_labels = heads.proposal_matcher(pairwise_iou(gt_boxes, prop_boxes))
    max_iou = heads.proposal_matcher.last_max_iou

    def sample_libra(idx, labels):
        return heads._sample_proposals(idx, labels, gt_classes)

    def sample_d2(idx, labels):
        return StandardROIHeads._sample_proposals(heads, idx, labels, gt_classes)

    def sample_only(sample):
        return lambda: sample(matched_idxs, matched_labels)

    def match_then(sample):
        return lambda: sample(*heads.proposal_matcher(pairwise_iou(gt_boxes, prop_boxes)))

    rounds, warmup = 20 * args.repeats, max(5, args.warmup)
    d2_name, libra_name = "detectron2 random (StandardROIHeads)", "LibraROIHeads._sample_proposals"
    fns = {d2_name: sample_only(sample_d2), libra_name: sample_only(sample_libra)}
    times = interleaved(fns, rounds, warmup, sync)
    times_m = interleaved(
        {
            "IoU matrix + matcher + detectron2 sampler": match_then(sample_d2),
            "IoU matrix + matcher + Libra sampler": match_then(sample_libra),
        },
        rounds,
        warmup,
        sync,
    )
    torch.set_num_threads(threads)

    # what each sampler did with the negatives (bins of width max IoU / 3); the matcher
    # ran again above: its IoUs are those of the same proposals
    edges = [i * float(max_iou.max()) / 3 for i in range(4)]
    per_bin = {}
    for name, sample in (("Libra", sample_libra), ("detectron2", sample_d2)):
        torch.manual_seed(0)
        idx, labels = sample(matched_idxs, matched_labels)
        neg_iou = heads.proposal_matcher.last_max_iou[idx[labels == heads.num_classes]]
        per_bin[name] = [
            int(((neg_iou >= a) & (neg_iou < b)).sum()) for a, b in zip(edges, edges[1:])
        ]

    where = f"{args.device}, 1 thread" if args.device == "cpu" else args.device
    print(
        f"\n(proposals: {int((matched_labels == 1).sum())} positives, "
        f"{int((matched_labels == 0).sum())} negatives, max IoU of a negative "
        f"{float(max_iou[matched_labels == 0].max()):.3f}; sampled negatives per IoU bin "
        f"(width max IoU / 3): Libra {per_bin['Libra']}, detectron2 {per_bin['detectron2']})"
    )
    reporter.timings(
        f"[sampler] RoI sampling per image: 2000 proposals x 20 GT, 512 RoIs, {where}",
        times,
        d2_name,
    )
    reporter.timings(
        f"[sampler] the same with the IoU matrix + matcher (label_and_sample_proposals), {where}",
        times_m,
        "IoU matrix + matcher + detectron2 sampler",
    )
