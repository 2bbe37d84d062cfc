"""Policy and PRM learners (SFT, online DPO, PRM training on Ray Train + DeepSpeed): issues 4-6."""
