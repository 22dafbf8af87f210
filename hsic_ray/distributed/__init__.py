"""Ray orchestration: stage actors, their placement, and the pipeline that chains them.

Nothing here knows how a layer's loss is computed: a stage actor wraps `hsic_ray.stage_step.StageStep`.
"""
