"""Build the offline demo's assets: a Japanese preference dataset, a character-level BPE tokenizer with a Llama-3
chat template, and a tiny Llama given a supervised warm-up on both replies of every pair, so that it answers each
prompt in Japanese about its own topic, then balanced so that it prefers neither helpful nor evasive, wrong or
off-topic replies: SimPO has work to do; and a tiny reward model trained on the training pairs by the scorer step
(train_reward_model.py), which scores the replies generate_candidates.py samples from the tiny Llama (the on-policy
demo). Held-out topics make the test split. Seeded and run on the CPU (about 4 minutes on 2 cores); the outputs are
committed under demo/.

    python demo/build_demo_assets.py [--out demo]
"""

import argparse
import json
from pathlib import Path

# (topic, what it is -- completes "{topic}は...", one useful extra sentence). Written by the team for this demo.
TOPICS = [
    (
        "富士山",
        "静岡県と山梨県にまたがる日本で最も高い山で、標高は3776メートルです",
        "夏の登山シーズンには多くの人が山頂を目指します。",
    ),
    (
        "桜",
        "春に咲く日本を代表する花で、ソメイヨシノが特によく知られています",
        "開花の時期は地域によって異なり、南から北へと移っていきます。",
    ),
    (
        "緑茶",
        "茶葉を発酵させずに作る日本の伝統的な飲み物です",
        "湯の温度を少し下げていれると、苦みが抑えられて甘みが出ます。",
    ),
    (
        "寿司",
        "酢で味をつけたご飯に魚介類などを合わせた日本料理です",
        "握り寿司や巻き寿司など、さまざまな種類があります。",
    ),
    ("京都", "千年以上にわたって都が置かれた歴史のある町です", "寺院や神社が多く、季節ごとに違った景色を楽しめます。"),
    (
        "光合成",
        "植物が光のエネルギーを使って、二酸化炭素と水から養分と酸素を作るはたらきです",
        "主に葉の葉緑体で行われます。",
    ),
    (
        "地震",
        "地下の岩盤が急にずれることで地面が揺れる現象です",
        "日ごろから家具を固定し、避難場所を確認しておくことが大切です。",
    ),
    (
        "睡眠",
        "体と脳を休ませ、記憶を整理するために欠かせない時間です",
        "寝る前にスマートフォンを見る時間を減らすと、眠りやすくなります。",
    ),
    ("俳句", "五・七・五の十七音で作る日本の短い詩です", "季節を表す季語を入れるのが基本的な決まりです。"),
    (
        "月",
        "地球のまわりを約27日かけて回る衛星です",
        "満ち欠けは、太陽の光が当たる部分の見え方が変わることで起こります。",
    ),
    (
        "温泉",
        "地中から湧き出る温かい水で、日本各地に数多くあります",
        "入る前に体を洗い、長く入りすぎないように気をつけましょう。",
    ),
    (
        "新幹線",
        "日本の主要都市を結ぶ高速鉄道で、最高速度は時速300キロメートルを超えます",
        "時間に正確な運行で知られています。",
    ),
    (
        "プログラミング",
        "コンピューターにしてほしい処理を、プログラミング言語で書き表す作業です",
        "小さなプログラムを実際に動かしながら学ぶと上達が早くなります。",
    ),
    (
        "Python",
        "読みやすい文法を持つプログラミング言語で、データ分析や機械学習でよく使われます",
        "公式のチュートリアルから始めるのがおすすめです。",
    ),
    (
        "機械学習",
        "データからパターンを学び、予測や判断を行うコンピューターの技術です",
        "良い結果を得るには、質の高いデータを集めることが重要です。",
    ),
    (
        "水",
        "水素と酸素からできている物質で、生き物が生きていくために欠かせません",
        "一日を通してこまめに水分をとることが健康につながります。",
    ),
    (
        "太陽",
        "太陽系の中心にある恒星で、地球に光と熱を届けています",
        "直接見ると目を傷めるので、観察するときは専用の道具を使いましょう。",
    ),
    (
        "虹",
        "空気中の水滴によって太陽の光が分かれ、色の帯として見える現象です",
        "太陽を背にして雨上がりの空を見ると、見つけやすくなります。",
    ),
    (
        "味噌汁",
        "出汁に味噌を溶かし、豆腐やわかめなどの具を入れた汁物です",
        "味噌は火を止める直前に入れると、香りがよく残ります。",
    ),
    (
        "着物",
        "日本の伝統的な衣服で、今では成人式や結婚式などの特別な日によく着られます",
        "季節によって素材や柄を選び分けます。",
    ),
    (
        "茶道",
        "客をもてなすためにお茶をたてる作法を大切にする日本の伝統文化です",
        "道具の扱い方や礼儀を通して、心を落ち着けることを学びます。",
    ),
    (
        "ラーメン",
        "中国から伝わった麺料理が日本で独自に発展したものです",
        "醤油、味噌、塩、豚骨など、地域ごとにさまざまな味があります。",
    ),
    (
        "台風",
        "熱帯の海上で発生する強い低気圧で、激しい雨と風をもたらします",
        "接近する前に、飲み水や懐中電灯などを準備しておきましょう。",
    ),
    ("読書", "本を読んで知識や考え方を広げる活動です", "毎日少しずつでも読む時間を決めると、習慣にしやすくなります。"),
    (
        "運動",
        "体を動かして筋力や持久力を高める活動で、健康の維持に役立ちます",
        "無理をせず、続けられる量から始めることが大切です。",
    ),
    (
        "図書館",
        "本や資料を集めて、誰でも利用できるようにしている施設です",
        "多くの図書館では、インターネットで本の予約ができます。",
    ),
    ("郵便", "手紙や荷物を相手に届ける仕組みです", "宛先の郵便番号を正しく書くと、早く確実に届きます。"),
    (
        "電車",
        "線路の上を電気の力で走る乗り物で、通勤や通学に広く使われています",
        "混雑する時間を避けると、快適に移動できます。",
    ),
    (
        "絵画",
        "絵の具などを使って、平面に形や色を描き表す芸術です",
        "美術館で実物を見ると、筆の跡や色の重なりまで感じられます。",
    ),
    (
        "音楽",
        "音の高さやリズムを組み合わせて、感情や情景を表す芸術です",
        "楽器を始めるなら、毎日短い時間でも練習を続けることが上達の近道です。",
    ),
    (
        "将棋",
        "二人で対戦する日本の伝統的な盤上の遊びで、取った駒を自分の駒として使えるのが特徴です",
        "初心者は、まず駒の動かし方を覚えるとよいでしょう。",
    ),
    (
        "漢字",
        "中国から伝わった文字で、日本語ではひらがなやカタカナと組み合わせて使われます",
        "部首の意味を知ると、新しい漢字も覚えやすくなります。",
    ),
    (
        "敬語",
        "相手や場面に合わせて敬意を表す言葉づかいで、尊敬語、謙譲語、丁寧語があります",
        "仕事の場面では、まず丁寧語を正しく使うことから始めましょう。",
    ),
    (
        "北海道",
        "日本の最も北にある大きな島で、広い自然と豊かな農業や漁業で知られています",
        "冬は寒さが厳しいので、訪れるときは暖かい服装が必要です。",
    ),
    (
        "沖縄",
        "日本の南にある県で、青い海と独自の文化で知られています",
        "台風の時期には、旅行の予定に余裕を持たせると安心です。",
    ),
    (
        "雪",
        "空の水蒸気が冷えて氷の結晶となり、地上に降ってくるものです",
        "雪の日は道が滑りやすいので、歩幅を小さくして歩きましょう。",
    ),
    ("火山", "地下のマグマが地表に噴き出してできた山です", "日本には多くの活火山があり、噴火の情報に注意が必要です。"),
    (
        "野菜",
        "食用にする草本植物の総称で、ビタミンや食物繊維を多く含みます",
        "色の違う野菜を組み合わせると、栄養のバランスが良くなります。",
    ),
    (
        "時間管理",
        "限られた時間の中で、やるべきことに優先順位をつけて進める工夫です",
        "一日の始めに、その日の重要な仕事を三つ書き出すと効果的です。",
    ),
    (
        "節約",
        "無駄な出費を減らして、お金を計画的に使うことです",
        "毎月の支出を記録すると、減らせる費用が見えてきます。",
    ),
    (
        "リサイクル",
        "使い終わった物を資源として回収し、再び製品に生かす取り組みです",
        "地域のルールに従ってごみを正しく分別することが第一歩です。",
    ),
    (
        "インターネット",
        "世界中のコンピューターをつなぐ通信網で、情報のやり取りや買い物に使われています",
        "不審なメールのリンクは開かないように注意しましょう。",
    ),
    (
        "パスワード",
        "本人であることを確かめるために使う秘密の文字列です",
        "長く推測されにくいものを選び、サービスごとに使い分けることが大切です。",
    ),
    (
        "天気予報",
        "観測データをもとに、これからの天気を予想して伝える情報です",
        "降水確率は、一定量以上の雨が降る可能性を表しています。",
    ),
    (
        "深呼吸",
        "ゆっくりと大きく息を吸って吐く呼吸法で、気持ちを落ち着かせる効果があります",
        "四秒かけて吸い、六秒かけて吐くことを数回繰り返してみてください。",
    ),
]

QUESTIONS = [
    "{t}について簡単に教えてください。",
    "{t}とは何ですか？",
    "{t}の特徴を説明してもらえますか。",
    "初心者にもわかるように{t}を説明してください。",
    "{t}について知っておくべきことは何ですか？",
    "{t}について、要点を短くまとめてください。",
]

CHOSEN = [
    "{t}は{fact}。{tip}",
    "もちろんです。{t}は{fact}。{tip}ほかに知りたいことがあれば、気軽に聞いてください。",
    "簡単にまとめると、{t}は{fact}。さらに言えば、{tip}",
]

# Rejected replies are fluent and plausible, not gibberish: evasive, hedged and wrong (another topic's fact), or off
# the topic (an answer about another topic). The warm-up sees them as often as the chosen ones.
REJECTED = [
    "{t}についてですね。人によって考え方が違うので、一概には言えません。{other_tip}",
    "たしか、{t}は{wrong}だったと思います。{wrong_tip}",
    "よい質問ですね。ところで、{other}は{other_fact}。{other_tip}",
    "{t}については、専門家に聞くのが一番だと思います。{wrong_tip}",
    "うろ覚えですが、{t}は{wrong}かもしれません。{wrong_tip}",
]
HELD_OUT = 5  # every 5th topic is held out: its prompts are eval prompts only, never preference-trained
FACT_KEY = 10  # the reference fact of a prompt: the first characters of its topic's fact (fact_rate in the sweep)

# Llama-3's chat template: the template itself writes <|begin_of_text|>, as the real ELYZA/Llama-3 tokenizer does.
CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def preference_pairs():
    """{split: rows}: every (topic, question) pair, a helpful chosen reply and a plausible rejected one, and the
    reference fact (`reference`) the chosen reply states. Topics i % HELD_OUT == HELD_OUT - 1 are the test split;
    wrong facts and off-topic answers come from a topic of the same split."""
    splits = {"train": [], "test": []}
    for i, (topic, fact, tip) in enumerate(TOPICS):
        split = "test" if i % HELD_OUT == HELD_OUT - 1 else "train"
        same_split = [k for k in range(len(TOPICS)) if (k % HELD_OUT == HELD_OUT - 1) == (split == "test") and k != i]
        # One wrong topic and one other topic per topic, so that its rejected replies are as familiar as its chosen
        wrong = TOPICS[same_split[(3 * i) % len(same_split)]]
        other = TOPICS[same_split[(5 * i + 1) % len(same_split)]]
        for j, question in enumerate(QUESTIONS):
            chosen = CHOSEN[(i + j) % len(CHOSEN)].format(t=topic, fact=fact, tip=tip)
            rejected = REJECTED[(2 * i + j) % len(REJECTED)].format(
                t=topic, wrong=wrong[1], wrong_tip=wrong[2], other=other[0], other_fact=other[1], other_tip=other[2]
            )
            splits[split].append(
                {
                    "prompt": [{"role": "user", "content": question.format(t=topic)}],
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                    "reference": fact[:FACT_KEY],
                }
            )
    return splits


def write_dataset(out: Path):
    splits = preference_pairs()
    (out / "data").mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        with open(out / "data" / f"{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return splits


def build_tokenizer(texts, vocab_size=2048):
    """BPE over characters, not bytes: every token is whole characters, so a sampled reply is always valid text (a
    byte-level vocabulary lets a small model sample half of a three-byte Japanese character). The demo's texts and
    the chat template's own strings cover the alphabet; anything else encodes as <unk>, there is no byte fallback."""
    from tokenizers import Tokenizer, decoders, models, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[*SPECIAL_TOKENS, "<unk>"], show_progress=False)
    tokenizer.train_from_iterator([*texts, "user", "assistant", "system", "\n\n", " "], trainer=trainer)
    bos = tokenizer.token_to_id("<|begin_of_text|>")
    # Like Llama-3's tokenizer, encoding with special tokens prepends BOS (the chat template writes one too).
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
    )


def build_model(tokenizer, seed=0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def reply_examples(tokenizer, pairs, replies):
    """(token ids, labels) of prompt + reply in the chat template for each pair and each of `replies`; the labels
    are -100 on the prompt, so a loss or a log-probability counts the reply's tokens only."""
    examples = []
    for pair in pairs:
        prompt = tokenizer.apply_chat_template(pair["prompt"], add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        for reply in replies:
            full = tokenizer.apply_chat_template(pair["prompt"] + pair[reply], tokenize=False)
            ids = tokenizer(full, add_special_tokens=False).input_ids
            examples.append((ids, [-100] * len(prompt_ids) + ids[len(prompt_ids) :]))
    return examples


def batch_of(examples, pad_id):
    import torch

    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in examples])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in examples])
    attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in examples])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def warm_up(model, tokenizer, pairs, epochs=40, batch_size=16, learning_rate=1e-3, seed=0):
    """Supervised fine-tuning on prompt -> reply for the chosen AND the rejected reply of every pair (loss on the
    reply tokens only), in a plain loop: the model learns to read the prompt's topic, its fact, and to answer in
    Japanese, but has no preference between helpful and evasive, wrong or off-topic replies; that is SimPO's work.
    Topic conditioning takes long: with much fewer epochs the model gives every prompt the same reply."""
    import torch

    examples = reply_examples(tokenizer, pairs, ("chosen", "rejected"))
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(examples)).tolist()
        for start in range(0, len(order), batch_size):
            batch = batch_of([examples[i] for i in order[start : start + batch_size]], tokenizer.eos_token_id)
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        print(f"warm-up epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}", flush=True)
    return model.eval()


def preference(model, tokenizer, pairs, beta=2.5):
    """SimPO's preference on `pairs`, as the trainer measures it: the reward is beta times the mean log-probability
    of a reply's tokens; (accuracy, mean margin) of chosen over rejected."""
    import torch

    margins = []
    for start in range(0, len(pairs), 32):
        examples = reply_examples(tokenizer, pairs[start : start + 32], ("chosen", "rejected"))
        batch = batch_of(examples, tokenizer.eos_token_id)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        logps = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        rewards = beta * (logps * (labels != -100)).sum(-1) / (labels != -100).sum(-1)
        margins += (rewards[0::2] - rewards[1::2]).tolist()
    return sum(m > 0 for m in margins) / len(margins), sum(margins) / len(margins)


def balance(model, tokenizer, pairs, max_accuracy=0.62, max_margin=0.35, batch_size=16, learning_rate=1e-4, seed=0):
    """Once both replies are memorised, the length-normalised reward favours the chosen replies (longer, and each
    topic's fact seen in every one of its chosen replies): SimPO would start decided. A few gentle steps of the same
    supervised loss on the rejected replies alone, until the training pairs' preference for the chosen reply is near
    chance, hand SimPO an undecided model (one that does not prefer the chosen replies is left as it is). Held-out
    pairs are not looked at: the demo's undecided start on them is measured, not fitted."""
    import torch

    examples = reply_examples(tokenizer, pairs, ("rejected",))
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    order = torch.randperm(len(examples)).tolist()
    for step in range(100):
        accuracy, margin = preference(model.eval(), tokenizer, pairs)
        print(f"balancing step {step}: preference accuracy {accuracy:.3f}, margin {margin:.2f}", flush=True)
        if accuracy <= max_accuracy and margin < max_margin:  # only ever nudged away from chosen
            break
        model.train()
        start = (step * batch_size) % len(order)
        model(
            **batch_of([examples[i] for i in order[start : start + batch_size]], tokenizer.eos_token_id)
        ).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def build_reward_model(tokenizer, data, out, epochs=None, seed=0):
    """A tiny reward model for the on-policy demo (generate_candidates.py), trained by the product's own scorer step:
    train_reward_model.py with configs/demo_reward_model.yaml on the pairs in `data` (the test split's 9 topics held
    out: its accuracy, early stopping), from a fresh two-layer Llama with a one-score classification head
    (LlamaForSequenceClassification, as real reward models are) instead of the config's tiny-llama-ja, which keeps the
    demo's scorer small and fast. It learns what the demo's data calls good: the topic's own fact, not a hedge, a
    wrong fact or another topic. Its pad token is <|end_of_text|>, which the chat template never writes, so the score
    is read at a conversation's last token (<|eot_id|>). The model and its tokenizer are written to `out`; `epochs`
    caps the passes over the pairs (the config's own cap if None)."""
    import copy
    import shutil
    import sys
    import tempfile

    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    import train_reward_model

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.pad_token = "<|end_of_text|>"
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as scratch:
        base, run = Path(scratch) / "base", Path(scratch) / "run"
        LlamaForSequenceClassification(config).save_pretrained(base)
        tokenizer.save_pretrained(base)
        argv = ["--config", root / "configs" / "demo_reward_model.yaml", "--model_name_or_path", base,
                "--dataset_name", data, "--output_dir", run, *REWARD_SETTINGS]  # fmt: skip
        train_reward_model.main([*map(str, argv), *(["--num_train_epochs", str(epochs)] if epochs else [])])
        record = json.loads((run / "run_record.json").read_text(encoding="utf-8"))
        out.mkdir(parents=True, exist_ok=True)
        for name in REWARD_FILES:
            shutil.copy(run / name, out / name)
    tokenizer.save_pretrained(out)  # the run's own (the same tokenizer), without the keys loading it added
    return record["results"]


# The demo's reward model: configs/demo_reward_model.yaml's settings with these over them (a fresh model learns from
# scratch: a higher rate, more passes), and the files of its output that demo/tiny-reward-ja ships
REWARD_SETTINGS = ["--learning_rate", "2e-3", "--num_train_epochs", "12", "--per_device_train_batch_size", "16",
                   "--eval_steps", "14", "--save_steps", "14"]  # fmt: skip
REWARD_FILES = ("config.json", "model.safetensors")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    parser.add_argument("--epochs", type=int, default=40, help="warm-up epochs (the tests build with fewer)")
    parser.add_argument("--reward-epochs", type=int, default=None, help="reward model epochs, at most (the tests: 1)")
    args = parser.parse_args()
    out = args.out
    splits = write_dataset(out)
    pairs = splits["train"] + splits["test"]
    texts = [m["content"] for p in pairs for key in ("prompt", "chosen", "rejected") for m in p[key]]
    tokenizer = build_tokenizer(texts)
    # Every prompt, held-out ones included, with both replies: the model knows every topic's fact (so held-out replies
    # can state it) and prefers neither kind of reply anywhere.
    model = warm_up(build_model(tokenizer), tokenizer, pairs, epochs=args.epochs)
    model = balance(model, tokenizer, splits["train"])
    tokenizer.save_pretrained(out / "tiny-llama-ja")
    model.save_pretrained(out / "tiny-llama-ja")
    held_out = build_reward_model(tokenizer, out / "data", out / "tiny-reward-ja", epochs=args.reward_epochs)
    print(f"reward model: held-out accuracy {held_out['held_out_accuracy']:.3f} on {held_out['held_out_pairs']} pairs")
    print(
        f"wrote {len(pairs)} preference pairs to {out / 'data'}, a warmed-up tiny Llama to {out / 'tiny-llama-ja'} "
        f"and a tiny reward model to {out / 'tiny-reward-ja'}"
    )


if __name__ == "__main__":
    main()
