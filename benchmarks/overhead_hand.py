"""The hand-written side of ``benchmarks.overhead``: each objective's training step in plain PyTorch.

Every method does the maths of one objective's ``training_step`` on the module's backbone (weights only): the
transformer called as the diffusers pipeline calls it, the objective's pure loss functions, ``backward`` and the same
optimizer, switching peft adapters itself (diffusers' ``set_adapter``) where the objective keeps several.
"""

from __future__ import annotations

import torch


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)


def lora_params(denoiser: torch.nn.Module, adapter: str) -> list[torch.nn.Parameter]:
    return [p for n, p in denoiser.named_parameters() if "lora_" in n and f".{adapter}." in n]


def use(denoiser, adapter: str | None) -> None:
    """Run ``adapter`` alone (None: the base weights), with diffusers' peft calls."""
    if adapter is None:
        denoiser.disable_adapters()
    else:
        denoiser.enable_adapters()
        denoiser.set_adapter(adapter)


def transformer(denoiser, x, sigma, embeds):
    """The transformer called as the diffusers Wan pipeline calls it: the output is the velocity at ``sigma``."""
    return denoiser(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=embeds, return_dict=False)[0]


def guided(denoiser, x, sigma, cond, uncond, scale: float):
    v_c, v_u = transformer(denoiser, torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([cond, uncond])).chunk(2)
    return v_u + scale * (v_c - v_u)


class HandWritten:
    """The maths of each objective's training step in plain PyTorch, on the module's backbone (weights only)."""

    def __init__(self, module, objective: str, rollout=None) -> None:
        self.m, self.objective, self.rollout = module, objective, rollout
        self.den = module.backbone.denoiser
        self.hp = module.hparams
        self.shift = module.backbone.default_sampling_shift
        self.optimizers()

    def optimizers(self) -> None:
        if self.objective == "dmd":
            self.student, self.critic = lora_params(self.den, "default"), lora_params(self.den, "critic")
            self.opts = [adamw(self.student), adamw(self.critic)]
        else:
            self.student = lora_params(self.den, "default")
            self.opts = [adamw(self.student)]
        if self.objective == "nft":
            self.old, self.updates = lora_params(self.den, "old"), 0  # the EMA sampling policy; steps of this "fit"

    def embeds(self, prompts: list[str]) -> torch.Tensor:
        return self.m.backbone.encode_prompts(list(prompts)).prompt_embeds

    def step(self, batch: dict) -> None:
        getattr(self, self.objective)(batch)

    def sft(self, batch: dict) -> None:
        from lit_videoalign.objectives.sft import flow_matching_loss
        from lit_videoalign.schedules.flow import add_noise, sample_training_sigmas, velocity_target

        x0 = batch["latents"]
        cond = self.embeds(batch["prompt"])
        sigma = sample_training_sigmas(len(x0), mode="logit_normal", shift=self.shift).to(x0.device)
        noise = torch.randn_like(x0)
        loss = flow_matching_loss(transformer(self.den, add_noise(x0, noise, sigma), sigma, cond),
                                  velocity_target(x0, noise))
        opt = self.opts[0]
        opt.zero_grad()
        loss.backward()
        opt.step()

    def dpo(self, batch: dict) -> None:
        from lit_videoalign.objectives.dpo import flow_dpo_loss, per_sample_mse
        from lit_videoalign.schedules.flow import add_noise, sample_training_sigmas, velocity_target

        x_w, x_l = batch["chosen_latents"], batch["rejected_latents"]
        cond = self.embeds(batch["prompt"])
        sigma = sample_training_sigmas(len(x_w), mode="logit_normal", shift=self.shift).to(x_w.device)
        noise = torch.randn_like(x_w)  # shared by winner and loser
        x0, noise2, sigma2, cond2 = (torch.cat([x_w, x_l]), torch.cat([noise, noise]), torch.cat([sigma, sigma]),
                                     torch.cat([cond, cond]))
        x_t, target = add_noise(x0, noise2, sigma2), velocity_target(x0, noise2)
        with torch.no_grad():
            use(self.den, None)
            ref_w, ref_l = per_sample_mse(transformer(self.den, x_t, sigma2, cond2), target).chunk(2)
            use(self.den, "default")
        err_w, err_l = per_sample_mse(transformer(self.den, x_t, sigma2, cond2), target).chunk(2)
        loss = flow_dpo_loss(err_w, err_l, ref_w, ref_l, self.hp.beta)
        opt = self.opts[0]
        opt.zero_grad()
        loss.backward()
        opt.step()

    def grpo(self, batch: dict) -> None:
        from lit_videoalign.objectives.grpo import grpo_policy_loss
        from lit_videoalign.schedules.flow import sde_step_with_logprob

        r = self.rollout
        n, steps = len(r.prompts), r.sde_steps
        opt = self.opts[0]
        opt.zero_grad()
        for step in steps:
            x, x_next = r.latents[:, step], r.latents[:, step + 1]
            s, s_next = r.sigmas[step].expand(n), r.sigmas[step + 1].expand(n)
            v = transformer(self.den, x, s, r.cond.prompt_embeds)
            _, log_prob, _, _ = sde_step_with_logprob(x, v, s, s_next, noise_level=self.hp.noise_level,
                                                      prev_sample=x_next)
            loss = grpo_policy_loss(log_prob, r.log_probs[:, step], r.advantages, self.hp.clip_range)
            (loss / len(steps)).backward()
        torch.nn.utils.clip_grad_norm_(self.student, self.hp.max_grad_norm)
        opt.step()

    def dmd(self, batch: dict) -> None:
        from lit_videoalign.objectives.consistency import consistency_x0
        from lit_videoalign.objectives.dmd import dmd_generator_loss
        from lit_videoalign.objectives.sft import flow_matching_loss
        from lit_videoalign.schedules.flow import (
            add_noise,
            sample_training_sigmas,
            sampling_sigmas,
            shift_sigmas,
            velocity_target,
        )

        hp, den = self.hp, self.den
        prompts = list(batch["prompt"])
        n = len(prompts)
        cond, uncond = self.embeds(prompts), self.embeds([hp.negative_prompt] * n)
        shape = (n, *self.m.backbone.latent_shape(hp.num_frames, hp.height, hp.width))
        dev = cond.device
        sigma0 = torch.full((n,), float(sampling_sigmas(1, shift=self.m.sampling_shift)[0]), device=dev)
        opt_g, opt_c = self.opts
        # critic: flow matching on fresh one-step student samples
        with torch.no_grad():
            noise = torch.randn(shape, device=dev)
            x0 = consistency_x0(noise, transformer(den, noise, sigma0, cond), sigma0)
        use(den, "critic")
        sigma = sample_training_sigmas(n, mode="logit_normal", shift=self.shift).to(dev)
        eps = torch.randn_like(x0)
        loss = flow_matching_loss(transformer(den, add_noise(x0, eps, sigma), sigma, cond), velocity_target(x0, eps))
        opt_c.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.critic, hp.max_grad_norm)
        opt_c.step()
        use(den, "default")
        # generator: distribution matching between the teacher (base, guided) and the critic
        noise = torch.randn(shape, device=dev)
        x0 = consistency_x0(noise, transformer(den, noise, sigma0, cond), sigma0)
        u = hp.dm_sigma_min + (hp.dm_sigma_max - hp.dm_sigma_min) * torch.rand(n)
        sigma = shift_sigmas(u, self.shift).to(dev)
        x_t = add_noise(x0.detach(), torch.randn_like(x0), sigma)
        with torch.no_grad():
            use(den, None)
            x0_real = consistency_x0(x_t, guided(den, x_t, sigma, cond, uncond, hp.teacher_guidance_scale), sigma)
            use(den, "critic")
            x0_fake = consistency_x0(x_t, transformer(den, x_t, sigma, cond), sigma)
            use(den, "default")
        loss = dmd_generator_loss(x0, x0_real, x0_fake)
        opt_g.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student, hp.max_grad_norm)
        opt_g.step()

    def consistency(self, batch: dict) -> None:
        from lit_videoalign.objectives.consistency import consistency_loss, consistency_x0, ema_update
        from lit_videoalign.schedules.flow import add_noise, euler_step, sampling_sigmas

        hp, den = self.hp, self.den
        x0 = batch["latents"]
        prompts = list(batch["prompt"])
        cond, uncond = self.embeds(prompts), self.embeds([hp.negative_prompt] * len(prompts))
        grid = sampling_sigmas(hp.num_timesteps, shift=self.m.sampling_shift).to(x0.device)
        idx = torch.randint(0, hp.num_timesteps - hp.skip_steps + 1, (len(prompts),), device=x0.device)
        sigma, sigma_next = grid[idx], grid[idx + hp.skip_steps]
        x_t = add_noise(x0, torch.randn_like(x0), sigma)
        with torch.no_grad():
            use(den, None)
            x_next = euler_step(x_t, guided(den, x_t, sigma, cond, uncond, hp.teacher_guidance_scale), sigma,
                                sigma_next)
            use(den, "ema")
            target = consistency_x0(x_next, transformer(den, x_next, sigma_next, cond), sigma_next)
            use(den, "default")
        pred = consistency_x0(x_t, transformer(den, x_t, sigma, cond), sigma)
        loss = consistency_loss(pred, target, hp.loss_type, hp.huber_c)
        opt = self.opts[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema_update(lora_params(den, "ema"), self.student, hp.ema_decay)

    def nft(self, batch: dict) -> None:
        from lit_videoalign.backbones.adapters import ema_update
        from lit_videoalign.objectives.nft import nft_adaptive_loss, old_policy_decay
        from lit_videoalign.schedules.flow import add_noise, sampling_sigmas, velocity_target

        hp, den, r = self.hp, self.den, self.rollout
        n = len(r.prompts)
        dev = r.latents.device
        idx = torch.randperm(n, device=dev)  # the update's sample order (one micro-batch of every sample)
        x0, embeds = r.latents[idx], r.cond.prompt_embeds[idx]
        grid = sampling_sigmas(hp.num_sampling_steps, shift=self.m.sampling_shift)[:-1]  # the rollout's sigma grid
        grid = grid[grid > hp.sigma_min]
        sigma = grid[torch.randint(len(grid), (n,))].to(dev)
        noise = torch.randn_like(x0)
        x_t, target = add_noise(x0, noise, sigma), velocity_target(x0, noise)
        opt = self.opts[0]
        opt.zero_grad()
        v_theta = transformer(den, x_t, sigma, embeds)
        with torch.no_grad():
            use(den, "old")
            v_old = transformer(den, x_t, sigma, embeds)
            use(den, "default")  # peft's set_adapter makes "default" trainable again and "old" frozen
        loss = nft_adaptive_loss(v_theta, v_old, target, r.r[idx], hp.beta, sigma, r.valid[idx].float(),
                                 hp.adaptive_weighting)
        (loss * hp.adv_clip_max / hp.beta).backward()
        torch.nn.utils.clip_grad_norm_(self.student, hp.max_grad_norm)
        opt.step()
        ema_update(self.old, self.student, old_policy_decay(self.updates, hp.old_decay_rate, hp.old_decay_max))
        self.updates += 1
