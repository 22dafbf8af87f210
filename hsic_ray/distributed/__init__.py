"""Ray orchestration: placement of stages, the stage actors' lifecycle, and the batch pipeline that chains them.

Nothing here knows how a layer's loss is computed: a stage actor wraps `hsic_ray.stage_step.StageStep`.
`stages.py` starts, recovers and asks the actors; `ray_pipeline.py` sends batches through them;
`batches_per_call.py` chooses how many go in a call; `transport.py` moves tensors to and from the object store.
"""
