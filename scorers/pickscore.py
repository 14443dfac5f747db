"""PickScore: a fine-tuned CLIP ViT-H/14 in transformers' folder format, with the processor folder of
laion/CLIP-ViT-H-14-laion2B-s32B-b79K; score = logit_scale.exp() * cos(text, image) (~20-23).

Loaded from local folders only (safetensors preferred; transformers reads .bin files with weights_only), with
remote code refused."""
import os

import torch

from scorers import ScorerError, require_file
from scorers.clip import check_prompts, to_pil

PICKSCORE_SOURCE = 'https://huggingface.co/yuvalkirstain/PickScore_v1 (the whole folder)'
PROCESSOR_SOURCE = 'https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K (its processor files)'


class PickScore(torch.nn.Module):
    def __init__(self, model=None, processor=None, batch_size=16, option_prefix='reward', **_):
        super().__init__()
        from transformers import CLIPModel, CLIPProcessor
        require_file(model, 'PickScore', PICKSCORE_SOURCE, f'{option_prefix}.model')
        require_file(processor, 'CLIP processor', PROCESSOR_SOURCE, f'{option_prefix}.processor')
        for folder in (model, processor):
            if not os.path.isdir(folder):
                raise ScorerError(f"{folder} is not a folder; PickScore takes transformers' model and processor "
                                  "folders")
        try:
            self.model = CLIPModel.from_pretrained(model, local_files_only=True, trust_remote_code=False)
            self.processor = CLIPProcessor.from_pretrained(processor, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ScorerError(f"cannot read the PickScore folders {model}, {processor} "
                              f"({str(e).splitlines()[0][:160]}); set {option_prefix}.model/processor")
        self.model.eval().requires_grad_(False)
        self.batch_size = int(batch_size)

    @torch.no_grad()
    def forward(self, images, targets=None):
        prompts = check_prompts(targets, images.shape[0], 'pickscore')
        device = next(self.model.parameters()).device
        norm = torch.nn.functional.normalize
        pil, scores = to_pil(images), []
        for lo in range(0, len(pil), self.batch_size):
            inputs = self.processor(images=pil[lo:lo + self.batch_size], text=prompts[lo:lo + self.batch_size],
                                    padding='max_length', truncation=True, max_length=77, return_tensors='pt')
            f_img = self.model.get_image_features(pixel_values=inputs['pixel_values'].to(device))
            f_txt = self.model.get_text_features(input_ids=inputs['input_ids'].to(device),
                                                 attention_mask=inputs['attention_mask'].to(device))
            f_img, f_txt = (getattr(f, 'pooler_output', f) for f in (f_img, f_txt))
            cos = (norm(f_img.to(torch.float64), dim=-1) * norm(f_txt.to(torch.float64), dim=-1)).sum(-1)
            scores.append(self.model.logit_scale.exp().to(torch.float64) * cos)
        return torch.cat(scores)

    def normalise(self, scores):
        return (scores / 26).clamp(0, 1)
