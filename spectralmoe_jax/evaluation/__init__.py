"""Evaluation and prediction, model-agnostic: everything takes a `predict_fn(images) -> scores`.

  metrics.py     confusion matrices (jittable), per-class IoU / Acc, mIoU, mAcc, aAcc (mmseg)
  inference.py   whole-image and sliding-window inference, Hann blending, padding, flip TTA
  evaluator.py   `evaluate`: inference over examples, confusion matrices per domain, samples
  scene.py       `predict_scene`: a GeoTIFF of any size -> a label COG, in constant memory
  visualize.py   colour maps, false-colour composites, panels, expert-routing maps (PIL)
  report.py      `write_report`: one self-contained HTML page per evaluation
"""
