"""Reload a trained model and answer a Japanese prompt with it.

python demo/generate.py output/demo [--prompt 富士山について教えてください。]
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def generate(model_dir, prompt, max_new_tokens=48, seed=0):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    # The chat template writes <|begin_of_text|> itself, so the tokenizer must not add a second one.
    input_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    torch.manual_seed(seed)
    with torch.no_grad():
        output = model.generate(
            input_ids,
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=0.7,
            top_p=0.9,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("--prompt", default="富士山について教えてください。")
    args = parser.parse_args()
    print(f"prompt: {args.prompt}\nreply:  {generate(args.model_dir, args.prompt)}")


if __name__ == "__main__":
    main()
