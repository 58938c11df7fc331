"""
nanoforge in the browser: bring your text, train a GPT on it, watch it learn, sample it.

    pip install -r requirements.txt
    python app.py                                    # http://127.0.0.1:7860, runs saved in ./runs
    python app.py --host 0.0.0.0 --port 8080         # or GRADIO_SERVER_NAME / GRADIO_SERVER_PORT
    python app.py --runs_dir ~/gpt-runs --max_concurrent_runs 2 --max_upload_mb 500

The UI is a thin shell over the scripts, and shows the command behind every button:
- Train starts `python train.py ...` (`accelerate launch ... train.py ...` with several GPUs) from an argument
  list in its own process group, logging to RUN/train.log: closing the tab or restarting the app never stops a
  run. Progress is read back from RUN/metrics.jsonl, samples.jsonl and status.json.
- Stop sends SIGTERM (the run saves a checkpoint, status "stopped"); Resume runs `train.py --out_dir RUN --resume`.
- The speed estimate runs `python bench.py --only train ...` for a few real steps.
- Sample streams tokens from sample.py's `stream_text`, the generator `python sample.py` uses, in this process;
  fine-tune runs are sampled as `python sample.py --adapter RUN` samples them (base + adapter, prompt template).
- Share runs `python hub.py RUN user/name [--private] [--merged]`; a token typed on the page reaches it only through
  the child's HF_TOKEN environment variable, for that one push (never on its command line, in a file or a log).
On a Hugging Face Space with persistent storage mounted at /data, runs and uploads are kept under /data.
"""

import argparse
import html
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import threading
import unicodedata
import uuid
import zipfile
from collections import OrderedDict
from datetime import datetime
from pathlib import Path

# No request leaves the machine unless the user opts in. gradio and huggingface_hub read these when they are
# imported, so they are set (as defaults only) before the imports below.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
if "OMP_WAIT_POLICY" not in os.environ:  # sampling here shares the cores with training: see train.py
    os.environ.setdefault("GOMP_SPINCOUNT", "2000")

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402

import data  # noqa: E402  (numpy only; torch and the other scripts load lazily, see _module)

REPO = Path(__file__).resolve().parent
DEFAULT_DATA = data.DEFAULT_DATA
DATA_EXTS = data.EXTENSIONS  # what data.py reads
MAX_ZIP_MEMBERS = 1000  # files taken from one .zip
MAX_SESSION_FILES = 500  # files one visitor can add
CUSTOM = "defaults"  # the preset choice meaning "no preset: train.py's defaults plus the values on this page"
SAMPLE_SEP = "\n\n"

# ---------------------------------------------------------------------------------------------------------------
# UI text, English and Simplified Chinese (the browser's language picks one)

EN = {
    "title": "# nanoforge · train your own GPT",
    "subtitle": "Bring text, train a small GPT on it, watch it learn, then sample it. "
    "Every button runs a script you could type yourself, and shows you the command.",
    "tab_data": "1 · Data",
    "tab_train": "2 · Train",
    "tab_runs": "Runs",
    "tab_sample": "3 · Sample",
    "data_intro": "Upload your own text, paste some, or name a Hugging Face dataset. "
    "With nothing added, training uses the bundled tiny Shakespeare (1 MB).",
    "files": "Upload files (.txt .md .csv .jsonl .json .parquet, or a .zip of them)",
    "paste": "Or paste text",
    "add_paste": "Add pasted text",
    "clear_data": "Remove my files",
    "hub_dataset": "Hugging Face dataset (optional)",
    "hub_dataset_info": "e.g. roneneldan/TinyStories; downloaded by train.py when the run starts",
    "hf_split": "Split",
    "text_column": "Text column",
    "text_column_info": "the column holding the text in .csv .jsonl .json .parquet files and Hub datasets",
    "your_data": "Your data",
    "data_default": "Using the bundled **tiny Shakespeare** (`data/tinyshakespeare.txt`, 1.1 MB).",
    "tokenizer": "Tokenizer",
    "tokenizer_info": "char: one token per character (best for small text) · bpe: learned sub-words · "
    "pretrained: e.g. gpt2",
    "vocab_size": "BPE vocabulary size",
    "pretrained_tokenizer": "Pretrained tokenizer (folder or Hub id)",
    "analyze": "Show corpus stats and token preview",
    "stats": "Corpus stats",
    "token_preview": "How the tokenizer splits your text",
    "preset": "Preset",
    "preset_info": "a small YAML file in configs/; change any value below to override it",
    "no_preset": "none (train.py defaults)",
    "run_name": "Run name (folder under runs/)",
    "architecture": "Model size",
    "n_layer": "Layers",
    "n_head": "Attention heads",
    "n_embd": "Width (embedding size)",
    "block_size": "Context length (tokens)",
    "dropout": "Dropout",
    "measure": "Measure speed on this machine",
    "training": "Training",
    "batch_size": "Batch size",
    "max_iters": "Iterations",
    "learning_rate": "Learning rate",
    "eval_interval": "Evaluate every (iterations)",
    "more": "More settings",
    "grad_accum": "Gradient accumulation steps",
    "warmup_iters": "Warm-up iterations",
    "weight_decay": "Weight decay",
    "max_minutes": "Time limit (minutes, 0 = none)",
    "dtype": "Precision",
    "seed": "Seed",
    "threads": "CPU threads for training",
    "threads_info": "leaves a core free for this page and sampling",
    "sample_prompt": "Prompt for the samples shown while training",
    "command": "Command that Start runs",
    "start": "Start training",
    "stop": "Stop",
    "resume": "Resume",
    "more_iters": "Resume up to iteration (0 = as configured)",
    "loss_plot": "Loss",
    "samples": "Latest samples",
    "log": "Log (train.log)",
    "runs_intro": "Every run folder on disk. Click a row to select it.",
    "refresh": "Refresh",
    "selected_run": "Selected run",
    "open": "Open in Train tab",
    "delete": "Delete…",
    "confirm_delete": "Yes, delete it",
    "cancel": "Cancel",
    "compare": "Compare runs (loss curves overlaid)",
    "compare_plot": "Loss curves",
    "model": "Run or model folder",
    "model_info": "a run from the list (a fine-tune: its adapter on its base, as `sample.py --adapter`), "
    "a folder with config.json + model.safetensors, or a Hub id like gpt2",
    "prompt": "Prompt",
    "temperature": "Temperature",
    "top_k": "Top-k (0 = off)",
    "top_p": "Top-p",
    "repetition_penalty": "Repetition penalty",
    "max_new_tokens": "Max new tokens",
    "num_samples": "Number of samples",
    "generate": "Generate",
    "output": "Output",
    "sample_command": "Same thing from a terminal",
    "bench_command": "Measured with",
    "share": "Share on the Hugging Face Hub",
    "share_intro": "Uploads the selected run's model (or a fine-tune's adapter) with a generated model card: "
    "config, data stats, losses, a loss curve, samples and how to load it. Checkpoints are never uploaded.",
    "repo_id": "Repository (user/name)",
    "repo_id_info": "created if it does not exist; your user name or an organisation you can write to",
    "private": "Private repository",
    "push_merged": "Push the merged model instead of the adapter",
    "hf_token": "Hugging Face token (optional)",
    "hf_token_info": "a token with write access (huggingface.co/settings/tokens); empty: HF_TOKEN or `hf auth login`"
    " on this machine. Used for this push only, never saved or shown.",
    "push": "Push to the Hub",
    "hub_command": "Command that Push runs (the token goes in HF_TOKEN, not on the command line)",
}

ZH = {
    "title": "# nanoforge · 训练你自己的 GPT",
    "subtitle": "上传文本，在上面训练一个小 GPT，看着它学习，然后让它写作。"
    "每个按钮都运行一个你也可以自己输入的脚本，并显示对应的命令。",
    "tab_data": "1 · 数据",
    "tab_train": "2 · 训练",
    "tab_runs": "运行记录",
    "tab_sample": "3 · 生成",
    "data_intro": "上传你自己的文本、粘贴文本，或填写一个 Hugging Face 数据集。"
    "什么都不添加时，训练使用自带的 tiny Shakespeare（1 MB）。",
    "files": "上传文件（.txt .md .csv .jsonl .json .parquet，或它们的 .zip 压缩包）",
    "paste": "或粘贴文本",
    "add_paste": "添加粘贴的文本",
    "clear_data": "移除我的文件",
    "hub_dataset": "Hugging Face 数据集（可选）",
    "hub_dataset_info": "例如 roneneldan/TinyStories；开始训练时由 train.py 下载",
    "hf_split": "划分",
    "text_column": "文本列",
    "text_column_info": ".csv .jsonl .json .parquet 文件和 Hub 数据集中存放文本的列",
    "your_data": "你的数据",
    "data_default": "使用自带的 **tiny Shakespeare**（`data/tinyshakespeare.txt`，1.1 MB）。",
    "tokenizer": "分词器",
    "tokenizer_info": "char：每个字符一个 token（适合小文本）· bpe：学习得到的子词 · "
    "pretrained：例如 gpt2",
    "vocab_size": "BPE 词表大小",
    "pretrained_tokenizer": "预训练分词器（文件夹或 Hub id）",
    "analyze": "查看语料统计和分词预览",
    "stats": "语料统计",
    "token_preview": "分词器如何切分你的文本",
    "preset": "预设",
    "preset_info": "configs/ 中的小 YAML 文件；修改下面任何值即可覆盖",
    "no_preset": "无（train.py 默认值）",
    "run_name": "运行名称（runs/ 下的文件夹）",
    "architecture": "模型大小",
    "n_layer": "层数",
    "n_head": "注意力头数",
    "n_embd": "宽度（嵌入维度）",
    "block_size": "上下文长度（token）",
    "dropout": "Dropout",
    "measure": "在本机测量速度",
    "training": "训练",
    "batch_size": "批大小",
    "max_iters": "迭代次数",
    "learning_rate": "学习率",
    "eval_interval": "每隔多少次迭代评估",
    "more": "更多设置",
    "grad_accum": "梯度累积步数",
    "warmup_iters": "预热迭代次数",
    "weight_decay": "权重衰减",
    "max_minutes": "时间上限（分钟，0 = 不限）",
    "dtype": "精度",
    "seed": "随机种子",
    "threads": "训练使用的 CPU 线程数",
    "threads_info": "为本页面和生成留出一个核心",
    "sample_prompt": "训练中展示样本所用的提示",
    "command": "“开始”将运行的命令",
    "start": "开始训练",
    "stop": "停止",
    "resume": "继续训练",
    "more_iters": "继续训练到第几次迭代（0 = 按配置）",
    "loss_plot": "损失",
    "samples": "最新样本",
    "log": "日志（train.log）",
    "runs_intro": "磁盘上的所有运行文件夹。点击一行即可选中。",
    "refresh": "刷新",
    "selected_run": "选中的运行",
    "open": "在训练页打开",
    "delete": "删除…",
    "confirm_delete": "确定删除",
    "cancel": "取消",
    "compare": "比较运行（叠加损失曲线）",
    "compare_plot": "损失曲线",
    "model": "运行或模型文件夹",
    "model_info": "列表中的运行（微调运行：适配器加在其基础模型上，同 `sample.py --adapter`）、"
    "含 config.json + model.safetensors 的文件夹，或 Hub id（如 gpt2）",
    "prompt": "提示",
    "temperature": "温度",
    "top_k": "Top-k（0 = 关闭）",
    "top_p": "Top-p",
    "repetition_penalty": "重复惩罚",
    "max_new_tokens": "最多生成 token 数",
    "num_samples": "样本数",
    "generate": "生成",
    "output": "输出",
    "sample_command": "在终端中等价的命令",
    "bench_command": "测量命令",
    "share": "分享到 Hugging Face Hub",
    "share_intro": "上传选中运行的模型（微调运行则为适配器），并附上自动生成的模型卡："
    "配置、数据统计、损失、损失曲线、样本以及加载方法。检查点永远不会上传。",
    "repo_id": "仓库（用户名/名称）",
    "repo_id_info": "不存在时会自动创建；使用你的用户名或你有写权限的组织",
    "private": "私有仓库",
    "push_merged": "上传合并后的模型，而不是适配器",
    "hf_token": "Hugging Face 令牌（可选）",
    "hf_token_info": "需要写权限（huggingface.co/settings/tokens）；留空则使用本机的 HF_TOKEN 或 `hf auth login`。"
    "只用于这次上传，不会保存或显示。",
    "push": "上传到 Hub",
    "hub_command": "“上传”将运行的命令（令牌通过 HF_TOKEN 传递，不在命令行中）",
}

I18N = gr.I18n(en=EN, **{"zh-CN": ZH, "zh": ZH})
T = I18N  # T("key") -> a label the browser translates

# What the server writes at run time (status lines, notes), in the language the browser asks for. Errors from
# the scripts (data.DataError, train.py's `error:` lines) stay in their own words, as the CLI prints them.
SAY = {
    "en": {
        "cpu": "**CPU only ({cpus} cores).** Keep models small here: the defaults train in about a minute and the "
               "`tiny` preset in seconds; presets such as `shakespeare_char` and `gpt2` want a GPU.",
        "gpu": "**GPU:** {n} × {name}",
        "gpu_multi": " — training runs on all of them with `accelerate launch`",
        "data_default": "Using the bundled **tiny Shakespeare** (`data/tinyshakespeare.txt`, 1.1 MB).",
        "data_files": "**{n} file(s), {size}:** {names}",
        "more": " and {n} more",
        "params": "**{n} parameters**",
        "params_char": " (≈: a char vocabulary is as large as your text's alphabet)",
        "bad_heads": "✗ Width {c} must be divisible by the number of heads {h}.",
        "no_preset": "train.py's defaults: a small character-level model, about a minute on a laptop CPU.",
        "failed": "✗ **Training failed:** {msg}",
        "stopped": "■ **Stopped** at iteration {it}. Resume continues from the last checkpoint.",
        "finished": "✓ **Finished.** The model is in `{path}`: try it in the Sample tab.",
        "preparing": "● **Training…** (preparing the data and the model first)",
        "training": "● **Training…**",
        "busy": "The machine is busy: run {names} is training. Stop it or wait for it to finish "
                "(at most {n} training run(s) at a time).",
        "exists": "✗ A run called “{name}” already exists: pick another name, or open it in the Runs tab "
                  "to resume it.",
        "started": "● Started **{name}**.",
        "stopping": "■ Stopping **{name}**: saving a checkpoint…",
        "not_running": "Run “{name}” is not running.",
        "nothing": "Nothing is running from this page.",
        "open_first": "✗ Open a run first (Runs tab).",
        "already": "Run “{name}” is already training.",
        "resuming": "● Resuming **{name}**: `{cmd}`",
        "per_1000": "**≈ {t} per 1,000 iterations** ({ms} ms/iter, {tok} tokens/s)",
        "whole_run": "{n} iterations ≈ {t} plus evaluations",
        "peak": "peak {where} for training ≈ {mb} MB",
        "measured_busy": " (measured while “{name}” was training: on a free machine it is faster)",
        "too_slow": "✗ Five timed steps took over 5 minutes: this model is too big for this machine.",
        "no_measure": "✗ Could not measure: {err}",
        "confirm": "Delete **{name}** and everything in it?",
        "deleted": "Deleted “{name}”.",
        "delete_running": "✗ “{name}” is training: stop it first.",
        "no_run": "✗ No run called “{name}”.",
        "removed": "Removed your files; training will use tiny Shakespeare.",
        "paste_empty": "✗ The text box is empty: paste some text first.",
        "no_files": "No files received.",
        "running": "running", "finished_s": "finished", "stopped_s": "stopped", "failed_s": "failed",
        "eta": "ETA", "elapsed": "elapsed", "best_val": "best val", "val_acc": "val accuracy",
        "finished_adapter": "✓ **Finished.** The adapter is in `{path}`: try it in the Sample tab.",
        "finished_head": "✓ **Finished.** The {format} model is in `{path}`: it predicts labels, not text "
                         "(`finetune.predict`).",
        "push_pick": "✗ Select a run first.",
        "push_running": "✗ “{name}” is training: let it finish or stop it, then push.",
        "push_nothing": "“{name}” holds no model yet: nothing to push.",
        "bad_repo": "✗ “{repo}” is not a repository id: use user/name (letters, digits, '-', '_', '.').",
        "need_token": "✗ Paste your Hugging Face token: on a shared server pushes use the visitor's own token.",
        "pushed": "✓ **Pushed** to [{url}]({url})",
        "push_failed": "✗ **Push failed:** {msg}",
        "push_timeout": "✗ The push took over an hour and was stopped; try again on a faster connection.",
    },
    "zh": {
        "cpu": "**仅有 CPU（{cpus} 核）。** 请使用小模型：默认设置约一分钟训练完，"
               "`tiny` 预设只需几秒；"
               "`shakespeare_char`、`gpt2` 等预设需要 GPU。",
        "gpu": "**GPU：** {n} × {name}",
        "gpu_multi": " —— 训练通过 `accelerate launch` 使用全部 GPU",
        "data_default": "使用自带的 **tiny Shakespeare**（`data/tinyshakespeare.txt`，1.1 MB）。",
        "data_files": "**{n} 个文件，{size}：** {names}",
        "more": " 等另外 {n} 个",
        "params": "**{n} 参数**",
        "params_char": "（约数：字符词表的大小等于文本中不同字符的个数）",
        "bad_heads": "✗ 宽度 {c} 必须能被注意力头数 {h} 整除。",
        "no_preset": "train.py 的默认设置：一个小型字符级模型，在笔记本 CPU 上约一分钟。",
        "failed": "✗ **训练失败：** {msg}",
        "stopped": "■ **已停止**，在第 {it} 次迭代。"
                   "“继续训练”会从最近的检查点接着训练。",
        "finished": "✓ **完成。** 模型保存在 `{path}`：到“生成”页试试吧。",
        "preparing": "● **训练中…**（正在准备数据和模型）",
        "training": "● **训练中…**",
        "busy": "机器正忙：运行 {names} 正在训练。"
                "请停止它或等它结束（同时最多 {n} 个训练）。",
        "exists": "✗ 已有名为“{name}”的运行："
                  "请换一个名称，或在“运行记录”页打开它继续训练。",
        "started": "● 已开始 **{name}**。",
        "stopping": "■ 正在停止 **{name}**：保存检查点…",
        "not_running": "运行“{name}”没有在训练。",
        "nothing": "本页面没有正在进行的训练。",
        "open_first": "✗ 请先打开一个运行（“运行记录”页）。",
        "already": "运行“{name}”已经在训练。",
        "resuming": "● 继续训练 **{name}**：`{cmd}`",
        "per_1000": "**每 1,000 次迭代约 {t}**（{ms} 毫秒/次，{tok} token/秒）",
        "whole_run": "{n} 次迭代约 {t}（另加评估时间）",
        "peak": "训练峰值{where}约 {mb} MB",
        "measured_busy": "（测量时“{name}”正在训练：空闲时会更快）",
        "too_slow": "✗ 五个计时步骤超过 5 分钟：这个模型对本机来说太大了。",
        "no_measure": "✗ 无法测量：{err}",
        "confirm": "删除 **{name}** 及其中的所有内容？",
        "deleted": "已删除“{name}”。",
        "delete_running": "✗ “{name}”正在训练：请先停止。",
        "no_run": "✗ 没有名为“{name}”的运行。",
        "removed": "已移除你的文件；训练将使用 tiny Shakespeare。",
        "paste_empty": "✗ 文本框是空的：请先粘贴文本。",
        "no_files": "没有收到文件。",
        "running": "训练中", "finished_s": "已完成", "stopped_s": "已停止", "failed_s": "失败",
        "eta": "剩余", "elapsed": "已用", "best_val": "最佳验证损失", "val_acc": "验证准确率",
        "finished_adapter": "✓ **完成。** 适配器保存在 `{path}`：到“生成”页试试吧。",
        "finished_head": "✓ **完成。** {format} 模型保存在 `{path}`：它预测标签，不生成文本"
                         "（`finetune.predict`）。",
        "push_pick": "✗ 请先选中一个运行。",
        "push_running": "✗ “{name}”正在训练：等它完成或先停止，再上传。",
        "push_nothing": "“{name}”还没有模型：没有可上传的内容。",
        "bad_repo": "✗ “{repo}”不是有效的仓库 id：请使用 用户名/名称（字母、数字、'-'、'_'、'.'）。",
        "need_token": "✗ 请粘贴你的 Hugging Face 令牌：在共享服务器上只能用访问者自己的令牌上传。",
        "pushed": "✓ **已上传**到 [{url}]({url})",
        "push_failed": "✗ **上传失败：** {msg}",
        "push_timeout": "✗ 上传超过一小时，已停止；请在更快的网络下重试。",
    },
}


def lang_of(request) -> str:
    """'zh' when the browser prefers Chinese, else 'en' (the same choice gr.I18n makes for the labels)."""
    accept = (request.headers.get("accept-language", "") if request is not None else "").strip().lower()
    return "zh" if accept.startswith("zh") else "en"


def say(lang: str, key: str, **kw) -> str:
    return SAY.get(lang, SAY["en"]).get(key, SAY["en"][key]).format(**kw)

CSS = """
.nf-bar {height: 14px; border-radius: 7px; background: var(--neutral-200); overflow: hidden;}
.nf-bar > div {height: 100%; background: linear-gradient(90deg, #f97316, #fb923c); transition: width .5s;}
.nf-progress {font-variant-numeric: tabular-nums;}
.nf-progress .nf-line {margin-top: 6px; color: var(--body-text-color-subdued);}
.nf-cmd textarea {font-family: var(--font-mono); font-size: 0.85em;}
footer {display: none !important;}
"""


def make_theme():
    return gr.themes.Soft(primary_hue="orange", secondary_hue="amber", neutral_hue="stone")


# ---------------------------------------------------------------------------------------------------------------
# Settings


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS / Windows
        return os.cpu_count() or 1


def default_train_threads() -> int:
    """Threads for a training process started by the UI: all cores but one. The page, log polling and in-app
    sampling need a core of their own; threaded matmuls collapse when another process takes one of their cores
    (on 2 cores, 2 training threads plus a busy UI ran ~35x slower than 1 thread)."""
    return max(1, cpu_count() - 1)


def default_runs_dir() -> Path:
    """./runs, or /data/runs on a Hugging Face Space with persistent storage (kept across restarts)."""
    mount = Path("/data")
    on_space = bool(os.environ.get("SPACE_ID")) or os.path.ismount(mount)
    if on_space and mount.is_dir() and os.access(mount, os.W_OK):
        return mount / "runs"
    return REPO / "runs"


class Settings:
    def __init__(self, runs_dir=None, uploads_dir=None, max_concurrent_runs=1, max_upload_mb=100.0,
                 max_concurrent_samples=2, train_threads=None, any_model_folder=True, server_token=True):
        self.runs_dir = Path(runs_dir or default_runs_dir()).expanduser().resolve()
        self.uploads_dir = Path(uploads_dir or self.runs_dir.parent / "uploads").expanduser().resolve()
        self.max_concurrent_runs = max(1, int(max_concurrent_runs))
        self.max_upload_bytes = int(float(max_upload_mb) * 1024 * 1024)
        self.max_concurrent_samples = max(1, int(max_concurrent_samples))
        self.train_threads = int(train_threads or default_train_threads())
        # Model folders outside runs/ and uploads/ can be sampled only when the page is served to this machine.
        self.any_model_folder = any_model_folder
        # Pushes with an empty token field use this machine's HF_TOKEN / cached login only when the page is served
        # to this machine: on a shared server (a Space) every visitor pushes with their own token.
        self.server_token = server_token


# ---------------------------------------------------------------------------------------------------------------
# Lazy imports: torch and the scripts load on first use (the first page load), so the app is up in seconds.

_import_lock = threading.Lock()


def _torch():
    with _import_lock:
        import torch

        if not getattr(_torch, "done", False):
            # Sampling in this process gets one thread: the core training leaves free (default_train_threads).
            torch.set_num_threads(1)
            _torch.done = True
        return torch


def _module(name):
    _torch()
    with _import_lock:
        import importlib

        return importlib.import_module(name)


def hardware() -> dict:
    torch = _torch()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    names = [torch.cuda.get_device_name(i) for i in range(gpus)]
    return {"gpus": gpus, "names": names, "cpus": cpu_count()}


def hardware_note(hw: dict, lang: str = "en") -> str:
    if hw["gpus"]:
        multi = say(lang, "gpu_multi") if hw["gpus"] > 1 else ""
        return say(lang, "gpu", n=hw["gpus"], name=hw["names"][0]) + multi
    return say(lang, "cpu", cpus=hw["cpus"])


# ---------------------------------------------------------------------------------------------------------------
# Uploads: sanitised names, size limits, safe .zip extraction, the same read errors as the CLI


def sanitize_filename(name: str, default: str = "file") -> str:
    """A bare, safe file name: no folders, no leading dots, only letters, digits, '.', '-', '_'."""
    name = unicodedata.normalize("NFKC", str(name)).replace("\\", "/").split("/")[-1]
    name = re.sub(r"[^\w.\-]+", "_", name).strip("._ ")
    stem, ext = os.path.splitext(name)
    if len(name) > 100:
        name = stem[: 100 - len(ext)] + ext
    return name or default


def _unique_path(folder: Path, name: str) -> Path:
    path, stem, ext, n = folder / name, Path(name).stem, Path(name).suffix, 1
    while path.exists():
        path, n = folder / f"{stem}-{n}{ext}", n + 1
    return path


def _mb(n: int) -> str:
    return f"{n / 1024 / 1024:.1f} MB" if n >= 100 * 1024 else f"{n / 1024:.1f} kB"


def check_readable(path: Path, text_column: str = "text") -> None:
    """Raise data.DataError (one line naming the file, as the CLI prints it) when data.py finds no text in it."""
    try:
        if not any(text.strip() for _, text in data.read_documents([str(path)], text_column=text_column)):
            raise data.DataError(f"{path}: the file is empty; add text or pick other files")
    except data.DataError as e:  # the visitor knows the file by its name, not by our upload folder
        raise data.DataError(str(e).replace(str(path), path.name)) from None


def _extract_zip(src: Path, name: str, dest_dir: Path, limit: int, room: int) -> tuple[list[Path], list[str]]:
    """Extract the data files of a zip into dest_dir, flattened, with sanitised names. Sizes are counted while
    reading (a zip can lie about them); links, folders, hidden files and other types are skipped."""
    saved, notes, total = [], [], 0
    try:
        zf = zipfile.ZipFile(src)
    except (zipfile.BadZipFile, OSError):
        return [], [f"{name}: not a valid .zip archive"]
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        if len(members) > MAX_ZIP_MEMBERS:
            return [], [f"{name}: holds {len(members)} files; the limit is {MAX_ZIP_MEMBERS}"]
        for m in members:
            base = m.filename.replace("\\", "/").split("/")[-1]
            if base.startswith(".") or "__MACOSX" in m.filename or stat.S_ISLNK(m.external_attr >> 16):
                continue
            if not base.lower().endswith(DATA_EXTS):
                notes.append(f"{name}/{sanitize_filename(base)}: skipped (not {' '.join(DATA_EXTS)})")
                continue
            if len(saved) >= room:
                notes.append(f"{name}: stopped after {len(saved)} files (limit {MAX_SESSION_FILES} per visitor)")
                break
            out = _unique_path(dest_dir, sanitize_filename(base))
            part = out.with_name(out.name + ".part")
            written = 0
            try:
                with zf.open(m) as fin, open(part, "wb") as fout:
                    while chunk := fin.read(1 << 20):
                        written += len(chunk)
                        total += len(chunk)
                        if written > limit or total > limit:
                            raise ValueError
                        fout.write(chunk)
            except ValueError:
                part.unlink(missing_ok=True)
                notes.append(f"{name}: unpacks to more than the {_mb(limit)} limit (--max_upload_mb); "
                             "the rest is skipped")
                break
            except (zipfile.BadZipFile, OSError, RuntimeError) as e:  # corrupt member, encrypted member
                part.unlink(missing_ok=True)
                notes.append(f"{name}/{base}: cannot be unpacked ({str(e).splitlines()[0]})")
                continue
            os.replace(part, out)
            saved.append(out)
    return saved, notes


def save_uploads(paths, dest_dir: Path, limit: int, have: int = 0, text_column: str = "text"
                 ) -> tuple[list[Path], list[str]]:
    """Copy uploaded files (and the contents of uploaded zips) into dest_dir; check each one reads as text.
    Returns (saved paths, one message line per file)."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    saved, notes = [], []
    for p in paths or []:
        src = Path(p)
        name = sanitize_filename(src.name)
        size = src.stat().st_size if src.exists() else 0
        room = MAX_SESSION_FILES - have - len(saved)
        if room <= 0:
            notes.append(f"✗ {name}: too many files (limit {MAX_SESSION_FILES} per visitor)")
            continue
        if size > limit:
            notes.append(f"✗ {name}: {_mb(size)} is over the {_mb(limit)} limit (--max_upload_mb)")
            continue
        if name.lower().endswith(".zip"):
            candidates, zip_notes = _extract_zip(src, name, dest_dir, limit, room)
            notes += [f"✗ {n}" for n in zip_notes]
        elif name.lower().endswith(DATA_EXTS):
            out = _unique_path(dest_dir, name)
            shutil.copyfile(src, out)
            candidates = [out]
        else:
            notes.append(f"✗ {name}: unsupported file type; use {' '.join(DATA_EXTS)} or a .zip of them")
            continue
        for out in candidates:
            try:
                check_readable(out, text_column)
            except data.DataError as e:
                out.unlink(missing_ok=True)
                notes.append(f"✗ {e}")
                continue
            except Exception as e:  # any other read failure still gets one line, never a traceback
                out.unlink(missing_ok=True)
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                notes.append(f"✗ {out.name}: cannot be read ({reason})")
                continue
            saved.append(out)
            notes.append(f"✓ {out.name} ({_mb(out.stat().st_size)})")
    return saved, notes


# ---------------------------------------------------------------------------------------------------------------
# Run folders: status, metrics, logs (written by train.py; this file only reads them)


def read_json(path: Path, default=None):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:  # a line still being written
                    pass
    except OSError:
        pass
    return rows


def tail(path: Path, n_lines: int = 12, n_bytes: int = 32768) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - n_bytes))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    lines = [line.split("\r")[-1] for line in text.splitlines()]  # keep the last state of \r progress bars
    return "\n".join(lines[-n_lines:])


def pid_alive(pid) -> bool:
    """True when `pid` is a live nanoforge training process (not a reused pid of something else)."""
    try:
        pid = int(pid)
        os.kill(pid, 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
            return False  # a zombie: finished, not yet reaped
        return b"train.py" in cmd or b"finetune.py" in cmd
    except OSError:
        return True  # no /proc (macOS): trust the pid


def plain_error(text: str) -> str:
    """The plain-words error in a script's output: its last `error: ...` line, else the last line of a traceback."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error:"):
            return line[len("error:"):].strip()
    if any(line.startswith("Traceback") for line in lines):
        return f"the script crashed: {lines[-1]}"
    return ""


def error_from_log(log: Path) -> str:
    return plain_error(tail(log, 400))


def dir_size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def loss_points(rows: list[dict]) -> list[dict]:
    """metrics.jsonl rows -> plot points (iter, loss, series): train loss from log lines, val from evals."""
    points = []
    for r in rows:
        if "iter" not in r:
            continue
        if "loss" in r:
            points.append({"iter": r["iter"], "loss": r["loss"], "series": "train"})
        if "val_loss" in r:
            points.append({"iter": r["iter"], "loss": r["val_loss"], "series": "val"})
    return points


def fmt_duration(seconds) -> str:
    if seconds is None:
        return "–"
    s = int(round(float(seconds)))
    h, m, s = s // 3600, s % 3600 // 60, s % 60
    return f"{h}h {m:02d}m" if h else (f"{m}m {s:02d}s" if m else f"{s}s")


def fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


# ---------------------------------------------------------------------------------------------------------------
# Training processes: started from argument lists, in their own session, never killed with the UI


class Launcher:
    """The training processes this app started, and the rules for starting more."""

    def __init__(self, settings: Settings):
        self.s = settings
        self.procs: dict[str, subprocess.Popen] = {}  # run folder -> process
        self.lock = threading.Lock()

    def reap(self):
        for run, p in list(self.procs.items()):
            if p.poll() is not None:
                del self.procs[run]

    def proc(self, run_dir: Path):
        self.reap()
        return self.procs.get(str(run_dir))

    def run_info(self, run_dir: Path, with_metrics: bool = True) -> dict:
        """Everything the pages show about one run folder."""
        st = read_json(run_dir / "status.json", {}) or {}
        cfg = read_json(run_dir / "config.json", {}) or {}
        status, message = st.get("status", ""), st.get("message", "") or ""
        proc = self.proc(run_dir)
        if proc is not None:
            status = "running"  # our process is alive (its status.json may still be the previous run's)
        elif status == "running" and not pid_alive(st.get("pid")):
            status = "failed"
            message = error_from_log(run_dir / "train.log") or (
                "the training process ended without saying why (killed, or out of memory?); "
                "Resume continues from the last checkpoint")
        elif not status:
            err = error_from_log(run_dir / "train.log")
            status = "failed" if (err or (run_dir / "train.log").exists()) else "empty"
            message = err or ("the training process exited before it started; see the log"
                              if status == "failed" else "")
        if status == "failed" and not message:
            message = error_from_log(run_dir / "train.log") or "see the log below"
        info = {"name": run_dir.name, "dir": run_dir, "status": status, "message": message,
                "iter": st.get("iter"), "config": cfg, "script": cfg.get("script", "train.py")}
        if with_metrics:
            rows = read_jsonl(run_dir / "metrics.jsonl")
            vals = [r["val_loss"] for r in rows if "val_loss" in r]
            info["rows"] = rows
            info["best_val"] = min(vals) if vals else None
            info["last"] = rows[-1] if rows else None
        return info

    def running(self) -> list[dict]:
        """Runs whose training process is alive, whoever started them (this app before a restart included)."""
        self.reap()
        out = []
        for run_dir in list_run_dirs(self.s.runs_dir):
            info = self.run_info(run_dir, with_metrics=False)
            if info["status"] == "running":
                out.append(info)
        return out

    def start(self, run_dir: Path, exec_argv: list[str], display: str, threads: int) -> list[str]:
        """Start `exec_argv` for run_dir unless the machine is busy. Returns the runs keeping it busy, if any."""
        with self.lock:
            busy = self.running()
            if len(busy) >= self.s.max_concurrent_runs:
                return [b["name"] for b in busy]
            run_dir.mkdir(parents=True, exist_ok=True)
            env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
            env.setdefault("TOKENIZERS_PARALLELISM", "false")
            with open(run_dir / "train.log", "ab") as log:
                log.write(f"$ {display}\n".encode())
                log.flush()
                self.procs[str(run_dir)] = subprocess.Popen(
                    exec_argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    env=env, start_new_session=True)  # own session: survives the UI, gets signals separately
            return []

    def stop(self, run_dir: Path) -> bool:
        """SIGTERM the run's process group: train.py saves a checkpoint and exits with status "stopped"."""
        proc = self.proc(run_dir)
        if proc is not None:
            pgid = proc.pid  # start_new_session made it the group leader (accelerate's workers included)
        else:
            pid = (read_json(run_dir / "status.json", {}) or {}).get("pid")
            if not pid_alive(pid):
                return False
            pgid = os.getpgid(int(pid))
            if pgid == os.getpgid(0):  # never signal our own group
                os.kill(int(pid), signal.SIGTERM)
                return True
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            return False
        return True


HEAD_FORMATS = ("classify", "regress")  # fine-tunes that predict labels or values, not text


def run_kind(cfg: dict) -> str:
    """What a run trains, for the Runs table: "pretrain" (train.py) or "method · format" (finetune.py)."""
    if cfg.get("script") == "finetune.py":
        return f"{cfg.get('method', 'lora')} · {cfg.get('format', 'text')}"
    return "pretrain"


def run_output(run_dir: Path) -> tuple[Path | None, str]:
    """(the folder holding a run's result, "model" | "adapter"), as sample.py and hub.py find it: RUN/model for
    train.py and full / freeze fine-tunes, RUN/adapter for adapter fine-tunes; (None, "") before the first save."""
    if (run_dir / "model" / "config.json").is_file():
        return run_dir / "model", "model"
    if (run_dir / "adapter" / "adapter_config.json").is_file():
        return run_dir / "adapter", "adapter"
    return None, ""


def run_format(run_dir: Path) -> str:
    """A fine-tune's data format (text | instruct | classify | regress); "text" for train.py runs."""
    cfg = read_json(run_dir / "config.json", {}) or {}
    return cfg.get("format", "text") if cfg.get("script") == "finetune.py" else "text"


def list_run_dirs(runs_dir: Path) -> list[Path]:
    """Run folders, newest first: folders in runs_dir with a config.json, status.json or train.log."""
    if not runs_dir.is_dir():
        return []
    dirs = [d for d in runs_dir.iterdir() if d.is_dir() and not d.name.startswith(".") and
            any((d / f).exists() for f in ("config.json", "status.json", "train.log"))]
    return sorted(dirs, key=lambda d: d.stat().st_mtime, reverse=True)


# ---------------------------------------------------------------------------------------------------------------
# Commands: what the buttons run, as argument lists (shown joined with shlex, never run through a shell)


def rel(path) -> str:
    """A path as the user would type it from the repository root."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def fmt_value(v) -> str:
    return format(v, "g") if isinstance(v, float) else str(v)


# UI fields that map 1:1 to train.py flags, in the order their components are passed to the handlers.
ARCH_FIELDS = ["n_layer", "n_head", "n_embd", "block_size", "dropout"]
HPARAM_FIELDS = ["batch_size", "max_iters", "learning_rate", "eval_interval", "grad_accum", "warmup_iters",
                 "weight_decay", "max_minutes", "dtype", "seed", "sample_prompt"]
DATA_FIELDS = ["tokenizer", "vocab_size", "pretrained_tokenizer", "hf_dataset", "hf_split", "text_column"]
TRAIN_FIELDS = ["preset", "run_name", *ARCH_FIELDS, *HPARAM_FIELDS, "threads", *DATA_FIELDS]


def list_presets() -> list[str]:
    return sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))


def preset_values(preset: str) -> dict:
    """TrainConfig defaults overlaid with configs/PRESET.yaml: the base the page's values are compared with."""
    train = _module("train")
    from dataclasses import asdict

    base = asdict(train.TrainConfig())
    if preset and preset != CUSTOM:
        base.update(train.load_config_file(REPO / "configs" / f"{preset}.yaml", train.TrainConfig))
    return base


def preset_description(preset: str) -> str:
    """The comment on the first line of configs/PRESET.yaml."""
    try:
        first = (REPO / "configs" / f"{preset}.yaml").read_text(encoding="utf-8").splitlines()[0]
    except (OSError, IndexError):
        return ""
    return first.lstrip("# ").strip()


def tokenizer_choice(value: str) -> tuple[str, str]:
    """train.py's tokenizer value -> (radio choice, pretrained name)."""
    return (value, "gpt2") if value in ("char", "bpe") else ("pretrained", value)


def train_args(cfg: dict, files: list[str], run_dir: Path) -> list[str]:
    """train.py arguments for the page's values: the preset, then each value that differs from it."""
    preset = cfg.get("preset") or CUSTOM
    base = preset_values(preset)
    args = ["train.py"] + (["--preset", preset] if preset != CUSTOM else [])
    if files:
        args += ["--data", *files]
    args += ["--out_dir", rel(run_dir)]
    page = {f: cfg.get(f) for f in ARCH_FIELDS + HPARAM_FIELDS}
    tok = cfg.get("tokenizer") or "char"
    page["tokenizer"] = (cfg.get("pretrained_tokenizer") or "gpt2").strip() if tok == "pretrained" else tok
    if tok == "bpe":
        page["vocab_size"] = cfg.get("vocab_size")
    for f in ("hf_dataset", "hf_split", "text_column"):
        page[f] = (cfg.get(f) or "").strip()
    for field, value in page.items():
        if value is None or value == "":
            continue
        default = base.get(field)
        if isinstance(default, bool):
            value = bool(value)
        elif isinstance(default, int):
            value = int(value)
        elif isinstance(default, float):
            value = float(value)
        if value != default:
            args += [f"--{field}", fmt_value(value)]
    return args + ["--threads", str(int(cfg.get("threads") or default_train_threads()))]


def vocab_estimate(tokenizer: str, vocab_size) -> int:
    """Vocabulary size before the data is tokenised: char ~ tiny Shakespeare's 65, pretrained ~ GPT-2's."""
    return {"char": 65, "bpe": int(vocab_size or 4096)}.get(tokenizer, 50257)


def bench_dtype(dtype: str, shape: dict) -> str:
    """What train.py's --dtype auto picks for this shape on this machine, so bench times the same thing."""
    if dtype != "auto":
        return dtype
    torch, train = _torch(), _module("train")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    block_params = 12 * shape["n_layer"] * shape["n_embd"] ** 2
    return train.resolve_dtype("auto", device, block_params)


def launch_prefix(gpus: int) -> tuple[list[str], list[str]]:
    """(what the user would type, what we execute) in front of the script name."""
    if gpus > 1:
        exe = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))
        flags = ["launch", "--multi_gpu", "--num_processes", str(gpus)]
        return ["accelerate", *flags], [exe, *flags]
    return ["python"], [sys.executable]


def command_line(argv: list[str]) -> str:
    return shlex.join(argv)


def sample_args(model: str, prompt, temperature, top_k, top_p, rep, max_new, seed, n, adapter=False) -> list[str]:
    """sample.py's arguments; adapter=True: `model` is a fine-tune run sampled with its recorded base."""
    args = ["sample.py", "--adapter" if adapter else "--model", model, "--prompt", prompt or "",
            "--max_new_tokens", str(int(max_new)), "--temperature", fmt_value(float(temperature))]
    args += ["--top_k", str(int(top_k or 0))]
    if float(top_p) < 1.0:
        args += ["--top_p", fmt_value(float(top_p))]
    if float(rep) != 1.0:
        args += ["--repetition_penalty", fmt_value(float(rep))]
    return args + ["--num_samples", str(int(n)), "--seed", str(int(seed))]


HUB_REPO = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")  # user/name, or a bare name


def hub_args(run: str, repo_id: str, private=False, merged=False) -> list[str]:
    """hub.py's arguments. No token: it reaches hub.py only through the HF_TOKEN environment variable."""
    return ["hub.py", run, repo_id] + (["--private"] if private else []) + (["--merged"] if merged else [])


# ---------------------------------------------------------------------------------------------------------------
# Sampling: models cached per folder, streamed with sample.py's stream_text


class ModelCache:
    def __init__(self, size: int = 2):
        self.size, self.items, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, ref: str, adapter: str | None = None):
        """(model, tokenizer, info) from sample.load_model for a run/model folder or Hub id, or for a fine-tune's
        adapter on the base it records; reloaded when the folder's files change."""
        sample = _module("sample")
        path = Path(adapter or ref)
        stamp = max((f.stat().st_mtime for f in path.rglob("*") if f.is_file()), default=0) if path.is_dir() else 0
        key = (ref, adapter, stamp)
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        if adapter:
            ref = adapter_base(adapter)
        loaded = sample.load_model(ref, adapter=adapter)
        with self.lock:
            for k in [k for k in self.items if k[:2] == key[:2]]:
                del self.items[k]
            self.items[key] = loaded
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return loaded


def adapter_base(adapter: str) -> str:
    """The base model a fine-tune's adapter records (what `sample.py --adapter RUN` loads it onto). A relative
    folder is taken from the repository root, where the scripts run and the shown commands are typed."""
    base = _module("finetune").adapter_base(adapter)
    path = Path(base).expanduser()
    return str(REPO / path) if not path.is_absolute() and (REPO / path).exists() else base


def sample_source(ref: str) -> tuple[str, str | None]:
    """(model, adapter) for sample.load_model. A fine-tune run (or adapter folder) with no model/ of its own is
    sampled as `python sample.py --adapter RUN` samples it: the adapter on its recorded base."""
    path = Path(ref)
    if path.is_dir() and not (path / "model" / "config.json").is_file() and (
            (path / "adapter" / "adapter_config.json").is_file() or (path / "adapter_config.json").is_file()):
        return "", str(path)
    return ref, None


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def resolve_model(ref: str, settings: Settings) -> str:
    """A run name, a folder or a Hub id -> what sample.load_model takes. Raises ValueError with a one-liner."""
    ref = (ref or "").strip()
    if not ref:
        raise ValueError("pick a run or type a model folder / Hub id")
    run = settings.runs_dir / ref
    if "/" not in ref and run.is_dir():
        return str(run)
    path = Path(ref).expanduser()
    if not path.is_absolute():
        path = (REPO / path)
    if path.exists():
        path = path.resolve()
        inside = any(path == d or d in path.parents for d in (settings.runs_dir, settings.uploads_dir))
        if not inside and not settings.any_model_folder:
            raise ValueError(f"{ref}: only folders under {rel(settings.runs_dir)} can be sampled on a shared server")
        return str(path)
    if HUB_ID.match(ref):
        return ref
    raise ValueError(f"{ref}: no such run, folder or Hub id")


# ---------------------------------------------------------------------------------------------------------------
# Page pieces rendered from run folders


def progress_html(info: dict, lang: str = "en") -> str:
    status, last = info["status"], info.get("last") or {}
    it = last.get("iter", info.get("iter") or 0) or 0
    total = last.get("max_iters") or info["config"].get("max_iters") or 0
    pct = 100.0 if status == "finished" else min(100.0, 100.0 * it / total) if total else 0.0
    icon = ICONS.get(status, "•")
    word = say(lang, status if status == "running" else f"{status}_s") if status in ICONS else status
    parts = [f"{icon} <b>{html.escape(info['name'])}</b> · {word}",
             f"iter {it:,} / {total:,}" if total else f"iter {it:,}"]
    if status == "running" and last:
        parts.append(f"{say(lang, 'eta')} {fmt_duration(last.get('eta_s'))}")
    if last.get("tokens_per_sec"):
        parts.append(f"{last['tokens_per_sec']:,.0f} tokens/s")
    if last.get("ms"):
        parts.append(f"{last['ms']:,.0f} ms/iter")
    if "loss" in last:
        parts.append(f"loss {last['loss']:.4f}")
    if info.get("best_val") is not None:
        parts.append(f"{say(lang, 'best_val')} {info['best_val']:.4f}")
    accuracy = [r["val_accuracy"] for r in info.get("rows") or [] if "val_accuracy" in r]
    if accuracy:  # classify fine-tunes
        parts.append(f"{say(lang, 'val_acc')} {accuracy[-1]:.1%}")
    if last.get("elapsed_s") is not None:
        parts.append(f"{say(lang, 'elapsed')} {fmt_duration(last['elapsed_s'])}")
    return (f"<div class='nf-progress'><div class='nf-bar'><div style='width:{pct:.1f}%'></div></div>"
            f"<div class='nf-line'>{' · '.join(parts)}</div></div>")


def status_markdown(info: dict, lang: str = "en") -> str:
    s, msg = info["status"], info["message"]
    if s == "failed":
        return say(lang, "failed", msg=msg)
    if s == "stopped":
        return say(lang, "stopped", it=info.get("iter") or 0)
    if s == "finished":
        folder, kind = run_output(info["dir"])
        path = rel(folder or info["dir"] / "model")
        fmt = info["config"].get("format") if info["script"] == "finetune.py" else None
        if fmt in HEAD_FORMATS:
            return say(lang, "finished_head", format=fmt, path=path)
        return say(lang, "finished_adapter" if kind == "adapter" else "finished", path=path)
    if s == "running":
        return say(lang, "training" if info.get("rows") else "preparing")
    return ""


def samples_text(run_dir: Path, n: int = 3) -> str:
    """The latest samples: text continuations; a fine-tune's tuned text next to its base's (same prompt and
    seed); a classifier's predictions with the true labels."""
    parts = []
    for r in read_jsonl(run_dir / "samples.jsonl")[-n:]:
        head, prompt = f"— iter {r.get('iter')} —", r.get("prompt", "")
        if "label" in r:
            parts.append(f"{head}\n{prompt}\n→ {r.get('text', '')} (true: {r['label']})")
        elif "base" in r:
            tuned = r.get("tuned", r.get("text", ""))
            parts.append(f"{head} tuned\n{prompt}{tuned}\n— base —\n{prompt}{r['base']}")
        else:
            parts.append(f"{head}\n{prompt}{r.get('text', '')}")
    return SAMPLE_SEP.join(parts)


ICONS = {"running": "●", "finished": "✓", "stopped": "■", "failed": "✗"}
LOSS_COLORS = {"train": "#f97316", "val": "#2563eb"}


def plot_frame(points: list[dict], series=()) -> pd.DataFrame:
    """Plot points as a frame with numeric axes even when empty, plus an invisible (NaN) point for each name in
    `series`. gradio's LinePlot fixes its colours from the series of the first data it draws, so the train
    plot starts with both of its series and only its data changes afterwards."""
    rows = [{"iter": 0, "loss": float("nan"), "series": name} for name in series] + list(points)
    frame = pd.DataFrame(rows, columns=["iter", "loss", "series"])
    return frame.astype({"iter": "int64", "loss": "float64", "series": "str"})


def compare_figure(runs: dict[str, list[dict]]):
    """Loss curves of several runs overlaid (matplotlib): train loss thin and pale, val loss bold with dots."""
    from matplotlib.figure import Figure  # no pyplot: figures built in server threads share no global state

    fig = Figure(figsize=(10, 4.2), dpi=100)
    ax = fig.subplots()
    for i, (name, rows) in enumerate(runs.items()):
        train = [(r["iter"], r["loss"]) for r in rows if "loss" in r]
        val = [(r["iter"], r["val_loss"]) for r in rows if "val_loss" in r]
        if train:
            ax.plot(*zip(*train), color=f"C{i % 10}", alpha=0.5, linewidth=1, label=f"{name} · train")
        if val:
            ax.plot(*zip(*val), color=f"C{i % 10}", marker="o", markersize=3, linewidth=2, label=f"{name} · val")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if runs:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def runs_table(launcher: Launcher) -> pd.DataFrame:
    rows = []
    for d in list_run_dirs(launcher.s.runs_dir):
        info = launcher.run_info(d)
        total = (info.get("last") or {}).get("max_iters") or info["config"].get("max_iters")
        when = datetime.fromtimestamp((d / "config.json").stat().st_mtime if (d / "config.json").exists()
                                      else d.stat().st_mtime)
        rows.append({
            "run": d.name,
            "type": run_kind(info["config"]),
            "status": info["status"],
            "iter": f"{info.get('iter') or 0} / {total}" if total else str(info.get("iter") or 0),
            "best val loss": round(info["best_val"], 4) if info.get("best_val") is not None else None,
            "size": _mb(dir_size(d)),
            "date": when.strftime("%Y-%m-%d %H:%M"),
            "note": info["message"][:120] if info["status"] == "failed" else "",
        })
    return pd.DataFrame(rows, columns=["run", "type", "status", "iter", "best val loss", "size", "date", "note"])


# ---------------------------------------------------------------------------------------------------------------
# The page


def build_ui(settings: Settings | None = None) -> gr.Blocks:
    s = settings or Settings()
    launcher = Launcher(s)
    model_cache = ModelCache()
    bench_cache: dict[tuple, dict] = {}
    presets = list_presets()

    # ----- helpers closed over the settings

    def run_dir_of(name: str) -> Path:
        """A run folder by name; the name must be a plain folder name directly under runs_dir."""
        name = (name or "").strip()
        if not name or sanitize_filename(name) != name:
            raise gr.Error(f"“{name}” is not a run name (letters, digits, '-', '_' and '.' only)")
        return s.runs_dir / name

    def default_run_name(files, hf_dataset="") -> str:
        stem = Path(files[0]).stem if files else (hf_dataset.split("/")[-1] if hf_dataset else DEFAULT_DATA.stem)
        return f"{sanitize_filename(stem)[:40]}-{datetime.now():%Y%m%d-%H%M%S}"

    def follow_data(name, state, hf_dataset):
        """Keep an automatic run name in step with the data (a name the visitor typed stays)."""
        if name and not re.fullmatch(r".+-\d{8}-\d{6}", name):
            return gr.update()
        return default_run_name((state or {}).get("files", []), (hf_dataset or "").strip())

    def data_summary(state: dict, lang: str) -> str:
        files = [Path(f) for f in state.get("files", [])]
        if not files:
            return say(lang, "data_default")
        total = sum(f.stat().st_size for f in files if f.exists())
        shown = ", ".join(f"`{f.name}`" for f in files[:12])
        shown += say(lang, "more", n=len(files) - 12) if len(files) > 12 else ""
        return say(lang, "data_files", n=len(files), size=_mb(total), names=shown)

    def session_dir(state: dict) -> Path:
        if not state.get("session"):
            state["session"] = uuid.uuid4().hex[:12]
        return s.uploads_dir / state["session"]

    def gpu_count() -> int:
        return hardware()["gpus"]

    def build_command(state: dict, cfg: dict) -> tuple[list[str], list[str], Path]:
        files = [rel(f) for f in state.get("files", [])]
        run_dir = run_dir_of(cfg.get("run_name") or default_run_name(files, cfg.get("hf_dataset") or ""))
        typed, executed = launch_prefix(gpu_count())
        args = train_args(cfg, files, run_dir)
        return typed + args, executed + args, run_dir

    # ----- Data tab

    def upload(files, state, text_column, request: gr.Request):
        lang = lang_of(request)
        state = dict(state or {})
        files = files if isinstance(files, list) else [files] if files else []
        saved, notes = save_uploads(files, session_dir(state), s.max_upload_bytes, len(state.get("files", [])),
                                    (text_column or "text").strip())
        state["files"] = state.get("files", []) + [str(p) for p in saved]
        return state, data_summary(state, lang), "\n".join(notes) or say(lang, "no_files")

    def add_text(text, state, request: gr.Request):
        state, lang = dict(state or {}), lang_of(request)
        if not (text or "").strip():
            return state, data_summary(state, lang), say(lang, "paste_empty")
        raw = text.encode("utf-8")
        if len(raw) > s.max_upload_bytes:
            too_big = f"✗ The pasted text is {_mb(len(raw))}; the limit is {_mb(s.max_upload_bytes)}."
            return state, data_summary(state, lang), too_big
        folder = session_dir(state)
        folder.mkdir(parents=True, exist_ok=True)
        out = _unique_path(folder, "pasted.txt")
        out.write_bytes(raw)
        state["files"] = state.get("files", []) + [str(out)]
        return state, data_summary(state, lang), f"✓ {out.name} ({_mb(len(raw))})"

    def clear_data(state, request: gr.Request):
        state, lang = dict(state or {}), lang_of(request)
        in_use = {(REPO / d).resolve() for run in list_run_dirs(s.runs_dir)
                  for d in (read_json(run / "config.json", {}) or {}).get("data", [])}
        for f in state.get("files", []):
            if Path(f).resolve() not in in_use:  # a run trained on it needs it to resume
                Path(f).unlink(missing_ok=True)
        state["files"] = []
        return state, data_summary(state, lang), say(lang, "removed")

    def analyze(state, tokenizer, vocab_size, pretrained, hf_dataset, hf_split, text_column):
        """Corpus stats and the first tokens, from data.py (tokenised into the cache training will reuse)."""
        files = list((state or {}).get("files", []))
        hf_dataset = (hf_dataset or "").strip()
        inputs = files or ([] if hf_dataset else [str(DEFAULT_DATA)])
        tok = (pretrained or "gpt2").strip() if tokenizer == "pretrained" else tokenizer
        opts = dict(tokenizer=tok, vocab_size=int(vocab_size or 4096), text_column=(text_column or "text").strip(),
                    hf_dataset=hf_dataset, hf_split=(hf_split or "train").strip())
        argv = ["python", "data.py", "--data", *[rel(f) for f in inputs], "--tokenizer", tok]
        argv += (["--vocab_size", str(opts["vocab_size"])] if tok == "bpe" else [])
        argv += (["--hf_dataset", hf_dataset, "--hf_split", opts["hf_split"]] if hf_dataset else [])
        argv += (["--text_column", opts["text_column"]] if opts["text_column"] != "text" else []) + ["--preview", "60"]
        try:
            stats = data.corpus_stats(inputs, **opts)
            pieces = data.token_preview(inputs, n_tokens=60, **opts)
        except data.DataError as e:
            raise gr.Error(str(e).replace(str(s.uploads_dir) + os.sep, ""), print_exception=False)
        names = {"documents": "documents", "characters": "characters", "distinct_characters": "distinct characters",
                 "tokens": "tokens", "vocab_size": "vocabulary (token ids)", "chars_per_token": "characters per token"}
        table = "| | |\n|---|---:|\n" + "\n".join(
            f"| {label} | {stats[key]:,.2f} |" if isinstance(stats[key], float) else f"| {label} | {stats[key]:,} |"
            for key, label in names.items() if key in stats)
        spans = [(text.replace("\n", "↵\n"), str(i % 2)) for i, (text, _) in enumerate(pieces)]
        return table, spans, command_line(argv)

    # ----- Train tab

    def init_page(state, run_state, request: gr.Request):
        """Page load: the preset that suits this machine, the data summary, and the run that is training now
        (so a refreshed page picks up where it was)."""
        hw = hardware()
        preset = "shakespeare_char" if hw["gpus"] and "shakespeare_char" in presets else CUSTOM
        busy = launcher.running()
        run = busy[0]["name"] if busy else (run_state or "")
        return [hardware_note(hw, lang_of(request)), preset, *on_preset(preset, request), s.train_threads, run,
                gr.Timer(active=bool(busy)), lang_of(request)]

    def on_preset(preset, request: gr.Request):
        """The preset's values on the page, so what you see is what runs."""
        base = preset_values(preset)
        tok, name = tokenizer_choice(base["tokenizer"])
        about = say(lang_of(request), "no_preset") if preset == CUSTOM else preset_description(preset)
        return [about, *[base.get(f) for f in ARCH_FIELDS + HPARAM_FIELDS], tok,
                base["vocab_size"], name]

    def command(state, *values):
        cfg = dict(zip(TRAIN_FIELDS, values))
        try:
            typed, _, _ = build_command(state or {}, cfg)
        except gr.Error as e:
            return f"# {e.message}"
        return command_line(typed)

    def param_count(n_layer, n_head, n_embd, block_size, tokenizer, vocab_size, request: gr.Request):
        torch, model, lang = _torch(), _module("model"), lang_of(request)
        if int(n_embd) % int(n_head):
            return say(lang, "bad_heads", c=n_embd, h=n_head)
        vocab = vocab_estimate(tokenizer, vocab_size)
        with torch.device("meta"):
            gpt = model.GPT(model.GPTConfig(n_layer=int(n_layer), n_head=int(n_head), n_embd=int(n_embd),
                                            block_size=int(block_size), vocab_size=vocab))
        note = say(lang, "params_char") if tokenizer == "char" else ""
        return say(lang, "params", n=fmt_params(gpt.num_params())) + note

    def measure(state, lang, *values):
        """Time a few real training steps of this shape with bench.py (a subprocess, as training runs)."""
        cfg = dict(zip(TRAIN_FIELDS, values))
        threads = int(cfg["threads"] or s.train_threads)
        shape = {k: int(cfg[k]) for k in ("n_layer", "n_head", "n_embd", "block_size", "batch_size")}
        shape["vocab_size"] = vocab_estimate(cfg["tokenizer"], cfg["vocab_size"])
        argv = ["bench.py", "--only", "train", *[a for k, v in shape.items() for a in (f"--{k}", str(v))],
                "--dtype", bench_dtype(cfg["dtype"], shape), "--steps", "5", "--threads", str(threads)]
        shown = gr.Textbox(value=command_line(["python", *argv]), visible=True)
        key = tuple(argv)
        if key not in bench_cache:
            env = dict(os.environ, OMP_NUM_THREADS=str(threads))
            try:
                done = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                                      timeout=300)
            except subprocess.TimeoutExpired:
                return say(lang, "too_slow"), shown
            rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
            row = next((r for r in rows if r.get("name") == "train_tokens_per_sec"), None)
            if done.returncode or row is None:
                return say(lang, "no_measure", err=plain_error(done.stderr) or "bench.py failed"), shown
            bench_cache[key] = row
        note = estimate_text(bench_cache[key], int(cfg["max_iters"] or 0), int(cfg["grad_accum"] or 1), lang)
        busy = launcher.running()
        if busy:
            note += say(lang, "measured_busy", name=busy[0]["name"])
        return note, shown

    def start(state, lang, *values):
        cfg = dict(zip(TRAIN_FIELDS, values))
        state = state or {}
        try:
            typed, executed, run_dir = build_command(state, cfg)
        except gr.Error as e:
            return gr.update(), f"✗ {e.message}", gr.Timer(active=False), gr.update()
        if run_dir.exists() and any(run_dir.iterdir()):
            return gr.update(), say(lang, "exists", name=run_dir.name), gr.Timer(active=False), gr.update()
        busy = launcher.start(run_dir, executed, command_line(typed), int(cfg["threads"] or s.train_threads))
        if busy:
            return gr.update(), busy_message(busy, lang), gr.Timer(active=False), gr.update()
        return run_dir.name, say(lang, "started", name=run_dir.name), gr.Timer(active=True), default_run_name(
            [rel(f) for f in state.get("files", [])], cfg.get("hf_dataset") or "")

    def busy_message(busy: list[str], lang: str) -> str:
        return say(lang, "busy", names=", ".join(f"“{b}”" for b in busy), n=s.max_concurrent_runs)

    def stop(run_name, request: gr.Request):
        lang = lang_of(request)
        if not run_name:
            return say(lang, "nothing")
        if not launcher.stop(run_dir_of(run_name)):
            return say(lang, "not_running", name=run_name)
        return say(lang, "stopping", name=run_name)

    def resume(run_name, up_to, request: gr.Request):
        lang = lang_of(request)
        if not run_name:
            return gr.update(), say(lang, "open_first"), gr.Timer(active=False)
        run_dir = run_dir_of(run_name)
        info = launcher.run_info(run_dir, with_metrics=False)
        if info["status"] == "running":
            return run_name, say(lang, "already", name=run_name), gr.Timer(active=True)
        script = info["script"] if info["script"] in ("train.py", "finetune.py") else "train.py"
        args = [script, "--out_dir", rel(run_dir), "--resume"]
        if int(up_to or 0) > 0:
            args += ["--max_iters", str(int(up_to))]
        args += ["--threads", str(s.train_threads)]
        typed, executed = launch_prefix(gpu_count())
        busy = launcher.start(run_dir, executed + args, command_line(typed + args), s.train_threads)
        if busy:
            return run_name, busy_message(busy, lang), gr.Timer(active=False)
        return run_name, say(lang, "resuming", name=run_name, cmd=command_line(typed + args)), gr.Timer(active=True)

    def poll(run_name, request: gr.Request):
        """Everything the Train tab shows about the watched run (called every second while it trains)."""
        if not run_name:
            return plot_frame([], LOSS_COLORS), "", "", "", "", gr.Timer(active=False)
        run_dir = run_dir_of(run_name)
        info, lang = launcher.run_info(run_dir), lang_of(request)
        return (plot_frame(loss_points(info["rows"]), LOSS_COLORS), progress_html(info, lang),
                samples_text(run_dir), tail(run_dir / "train.log"), status_markdown(info, lang),
                gr.Timer(active=info["status"] == "running"))

    # ----- Runs tab

    def refresh_runs():
        table = runs_table(launcher)
        names = list(table["run"])
        return table, gr.update(choices=names), gr.update(choices=names)

    def select_row(table: pd.DataFrame, evt: gr.SelectData):
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        return table.iloc[row]["run"]

    def open_run(name):
        run_dir_of(name)
        return name, gr.Timer(active=True), gr.Tabs(selected="train")

    def delete_run(name, request: gr.Request):
        run_dir, lang = run_dir_of(name), lang_of(request)
        if not run_dir.is_dir():
            return say(lang, "no_run", name=name), *refresh_runs(), gr.update(visible=False)
        if launcher.run_info(run_dir, with_metrics=False)["status"] == "running":
            return say(lang, "delete_running", name=name), *refresh_runs(), gr.update(visible=False)
        shutil.rmtree(run_dir)
        return say(lang, "deleted", name=name), *refresh_runs(), gr.update(visible=False)

    def confirm_delete(name, request: gr.Request):
        return gr.update(visible=bool(name)), say(lang_of(request), "confirm", name=name)

    def compare(names):
        return compare_figure({name: read_jsonl(run_dir_of(name) / "metrics.jsonl") for name in names or []})

    # ----- Sample tab

    def trained_runs() -> list[str]:
        """Runs that hold a saved model or adapter that writes text, newest first."""
        return [d.name for d in list_run_dirs(s.runs_dir)
                if run_output(d)[0] is not None and run_format(d) not in HEAD_FORMATS]

    def model_choices(current):
        """The model list; the current choice stays (it may be a folder or a Hub id)."""
        names = trained_runs()
        return gr.update(choices=names, value=current or (names[0] if names else None))

    def sample_command(model, prompt, temperature, top_k, top_p, rep, max_new, seed, n):
        ref = (model or "").strip()
        shown, adapter = ref or "RUN", False
        try:
            path = resolve_model(ref, s)
            adapter = sample_source(path)[1] is not None
            shown = rel(path) if Path(path).is_dir() else shown
        except ValueError:
            pass
        argv = sample_args(shown, prompt, temperature, top_k, top_p, rep, max_new, seed, n, adapter=adapter)
        return command_line(["python", *argv])

    def generate(model, prompt, temperature, top_k, top_p, rep, max_new, seed, n):
        """Stream samples as `python sample.py` prints them: an instruction fine-tune's prompt goes into its
        template and generation stops where the response ends."""
        sample, name = _module("sample"), (model or "").strip()
        try:
            ref = resolve_model(name, s)
        except ValueError as e:
            raise gr.Error(str(e), print_exception=False)
        try:
            gpt, tok, info = model_cache.get(*sample_source(ref))
        except Exception as e:  # ModelLoadError / DataError: one plain line, naming the run as the visitor does
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise gr.Error(msg.replace(ref, name), print_exception=False)
        fmt = info["nanoforge"].get("format")
        if fmt in HEAD_FORMATS:  # a full / freeze fine-tune with a label head (adapters say so when loaded)
            raise gr.Error(f"{name}: a {fmt} model; it predicts labels, not text (finetune.predict)",
                           print_exception=False)
        text, stops = sample.instruction_prompt(info, tok, prompt or "")
        out = ""
        for i in range(int(n)):
            if i:
                out += f"{SAMPLE_SEP}{'─' * 20}{SAMPLE_SEP}"
            out += text
            yield out
            pieces = sample.stream_text(gpt, tok, text, max_new_tokens=int(max_new),
                                        temperature=float(temperature), top_k=int(top_k) or None,
                                        top_p=float(top_p) if float(top_p) < 1.0 else None,
                                        repetition_penalty=float(rep), seed=int(seed) + i,
                                        stop_strings=stops.get("stop_strings", ()), stop_ids=stops.get("stop_ids", ()))
            try:
                for piece in pieces:
                    out += piece
                    yield out
            except ValueError as e:  # e.g. an empty prompt for a tokenizer without an end-of-text token
                raise gr.Error(str(e), print_exception=False)

    # ----- Share (Runs tab)

    def share_options(name, request: gr.Request):
        """The Share box for the selected run: the merged-model choice when there is one; no push while it trains
        or before it has saved a model."""
        lang, name = lang_of(request), (name or "").strip()
        run_dir = s.runs_dir / name if name and sanitize_filename(name) == name else None
        if run_dir is None or not run_dir.is_dir():
            return gr.update(visible=False, value=False), gr.update(interactive=False), ""
        merged = gr.update(visible=(run_dir / "merged" / "config.json").is_file(), value=False)
        if launcher.run_info(run_dir, with_metrics=False)["status"] == "running":
            return merged, gr.update(interactive=False), say(lang, "push_running", name=name)
        if run_output(run_dir)[0] is None:
            return merged, gr.update(interactive=False), say(lang, "push_nothing", name=name)
        return merged, gr.update(interactive=True), ""

    def hub_command(name, repo_id, private, merged):
        name = (name or "").strip()
        run = rel(s.runs_dir / name) if name and sanitize_filename(name) == name else "RUN"
        return command_line(["python", *hub_args(run, (repo_id or "").strip() or "user/name", private, merged)])

    def push(name, repo_id, private, merged, token, request: gr.Request):
        """Run `python hub.py RUN REPO`; the token typed on the page goes only into the child's environment and is
        dropped when the push ends (never returned, stored or logged)."""
        lang, repo_id, token = lang_of(request), (repo_id or "").strip(), (token or "").strip()
        if not (name or "").strip():
            return say(lang, "push_pick"), hub_command(name, repo_id, private, merged)
        run_dir = run_dir_of(name)
        shown = hub_command(name, repo_id, private, merged)
        if not run_dir.is_dir():
            return say(lang, "no_run", name=name), shown
        if launcher.run_info(run_dir, with_metrics=False)["status"] == "running":
            return say(lang, "push_running", name=name), shown
        if not HUB_REPO.match(repo_id):
            return say(lang, "bad_repo", repo=repo_id), shown
        if not token and not s.server_token:
            return say(lang, "need_token"), shown
        argv = hub_args(rel(run_dir), repo_id, private, merged)
        shown = command_line(["python", *argv])  # exactly what runs
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if token:
            env["HF_TOKEN"] = token
        try:
            done = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True, timeout=3600)
        except subprocess.TimeoutExpired:
            return say(lang, "push_timeout"), shown
        finally:
            env.clear()
        if done.returncode == 0:
            url = re.search(r"-> (\S+)\s*$", done.stdout)
            return say(lang, "pushed", url=url.group(1) if url else repo_id), shown
        msg = plain_error(done.stderr) or f"hub.py exited with code {done.returncode}"
        return say(lang, "push_failed", msg=msg.replace(token, "***") if token else msg), shown

    # ----- layout

    # delete_cache: gradio's copies of uploads go after an hour (what we keep is in uploads_dir)
    with gr.Blocks(title="nanoforge", delete_cache=(3600, 3600)) as demo:
        data_state = gr.State({})  # this visitor's uploads: {"session": id, "files": [paths]}
        run_state = gr.State("")  # the run this visitor watches
        lang_state = gr.State("en")  # "en" | "zh": the browser's language, for messages written at run time
        timer = gr.Timer(1.0, active=False)

        gr.Markdown(T("title"))
        gr.Markdown(T("subtitle"))
        with gr.Tabs() as tabs:
            with gr.Tab(T("tab_data"), id="data"):
                gr.Markdown(T("data_intro"))
                with gr.Row():
                    with gr.Column(scale=3):
                        # No file_types filter: a wrong file in a batch gets its own one-line message below
                        # instead of failing the whole upload.
                        files_in = gr.File(label=T("files"), file_count="multiple", type="filepath",
                                           elem_id="nf-files")
                        with gr.Accordion(T("paste"), open=False):
                            paste = gr.Textbox(label=T("paste"), lines=6, show_label=False)
                            add_paste_btn = gr.Button(T("add_paste"), size="sm")
                        with gr.Accordion(T("hub_dataset"), open=False):
                            with gr.Row():
                                hf_dataset = gr.Textbox("", label=T("hub_dataset"), info=T("hub_dataset_info"), scale=3)
                                hf_split = gr.Textbox("train", label=T("hf_split"), scale=1)
                    with gr.Column(scale=2):
                        data_md = gr.Markdown(T("data_default"), elem_id="nf-data-summary")
                        text_column = gr.Textbox("text", label=T("text_column"), info=T("text_column_info"))
                        upload_msg = gr.Textbox(label=T("your_data"), lines=4, interactive=False,
                                                elem_id="nf-upload-msg")
                        clear_btn = gr.Button(T("clear_data"), size="sm", variant="secondary")
                with gr.Row():
                    tokenizer = gr.Radio(["char", "bpe", "pretrained"], value="char", label=T("tokenizer"),
                                         info=T("tokenizer_info"))
                    vocab_size = gr.Slider(256, 32768, value=4096, step=256, label=T("vocab_size"), visible=False)
                    pretrained_tok = gr.Textbox("gpt2", label=T("pretrained_tokenizer"), visible=False)
                analyze_btn = gr.Button(T("analyze"), variant="secondary", elem_id="nf-analyze")
                data_cmd = gr.Textbox(label=T("sample_command"), interactive=False, max_lines=2, elem_classes="nf-cmd",
                                      buttons=["copy"])
                with gr.Row():
                    stats_md = gr.Markdown(label=T("stats"), elem_id="nf-stats")
                    preview = gr.HighlightedText(label=T("token_preview"), color_map={"0": "#fed7aa", "1": "#bfdbfe"},
                                                 show_legend=False, show_inline_category=False)

            with gr.Tab(T("tab_train"), id="train"):
                hw_md = gr.Markdown(elem_id="nf-hardware")
                with gr.Row():
                    # left: what to train; right: the command, the buttons and the live view of the run
                    with gr.Column(scale=5):
                        preset = gr.Dropdown([(T("no_preset"), CUSTOM), *presets], value=CUSTOM, label=T("preset"),
                                             info=T("preset_info"), elem_id="nf-preset")
                        preset_md = gr.Markdown(elem_id="nf-preset-desc")
                        run_name = gr.Textbox(label=T("run_name"), elem_id="nf-run-name")
                        with gr.Accordion(T("architecture"), open=True):
                            with gr.Row():
                                n_layer = gr.Slider(1, 48, step=1, value=4, label=T("n_layer"))
                                n_head = gr.Slider(1, 32, step=1, value=4, label=T("n_head"))
                            with gr.Row():
                                n_embd = gr.Slider(16, 2048, step=16, value=128, label=T("n_embd"))
                                block_size = gr.Slider(16, 2048, step=16, value=64, label=T("block_size"))
                            dropout = gr.Slider(0.0, 0.5, step=0.05, value=0.0, label=T("dropout"))
                            params_md = gr.Markdown(elem_id="nf-params")
                            measure_btn = gr.Button(T("measure"), size="sm")
                            estimate_md = gr.Markdown(elem_id="nf-estimate")
                            bench_cmd = gr.Textbox(label=T("bench_command"), interactive=False, max_lines=1,
                                                   elem_classes="nf-cmd", visible=False)
                        with gr.Accordion(T("training"), open=True):
                            with gr.Row():
                                batch_size = gr.Number(12, label=T("batch_size"), precision=0, minimum=1)
                                max_iters = gr.Number(2000, label=T("max_iters"), precision=0, minimum=1)
                            with gr.Row():
                                learning_rate = gr.Number(1e-3, label=T("learning_rate"), minimum=0)
                                eval_interval = gr.Number(250, label=T("eval_interval"), precision=0, minimum=1)
                            with gr.Accordion(T("more"), open=False):
                                with gr.Row():
                                    grad_accum = gr.Number(1, label=T("grad_accum"), precision=0, minimum=1)
                                    warmup_iters = gr.Number(100, label=T("warmup_iters"), precision=0, minimum=0)
                                with gr.Row():
                                    weight_decay = gr.Number(0.1, label=T("weight_decay"), minimum=0)
                                    max_minutes = gr.Number(0, label=T("max_minutes"), minimum=0)
                                with gr.Row():
                                    dtype = gr.Dropdown(["auto", "float32", "bfloat16", "float16"], value="auto",
                                                        label=T("dtype"))
                                    seed = gr.Number(1337, label=T("seed"), precision=0)
                                threads = gr.Number(s.train_threads, label=T("threads"), info=T("threads_info"),
                                                    precision=0, minimum=1, maximum=cpu_count())
                                sample_prompt = gr.Textbox("\n", label=T("sample_prompt"))
                    with gr.Column(scale=7):
                        cmd = gr.Textbox(label=T("command"), interactive=False, lines=2, buttons=["copy"],
                                         elem_classes="nf-cmd", elem_id="nf-command")
                        with gr.Row():
                            start_btn = gr.Button(T("start"), variant="primary", elem_id="nf-start")
                            stop_btn = gr.Button(T("stop"), variant="stop", elem_id="nf-stop")
                            resume_btn = gr.Button(T("resume"), elem_id="nf-resume")
                        resume_iters = gr.Number(0, label=T("more_iters"), precision=0, minimum=0)
                        train_msg = gr.Markdown(elem_id="nf-train-msg")
                        status_md = gr.Markdown(elem_id="nf-status")
                        progress = gr.HTML(elem_id="nf-progress")
                        loss_plot = gr.LinePlot(plot_frame([], LOSS_COLORS), x="iter", y="loss", color="series",
                                                color_map=LOSS_COLORS, color_title="", label=T("loss_plot"),
                                                height=360, elem_id="nf-loss")
                        samples_box = gr.Textbox(label=T("samples"), lines=6, max_lines=6, interactive=False,
                                                 elem_id="nf-samples")
                log_box = gr.Textbox(label=T("log"), lines=12, max_lines=12, interactive=False, autoscroll=True,
                                     elem_id="nf-log", elem_classes="nf-cmd")

            with gr.Tab(T("tab_runs"), id="runs") as runs_tab:
                gr.Markdown(T("runs_intro"))
                runs_df = gr.Dataframe(runs_table(launcher), interactive=False, elem_id="nf-runs", wrap=True)
                with gr.Row(equal_height=True):
                    selected = gr.Dropdown([], label=T("selected_run"), allow_custom_value=True, elem_id="nf-selected",
                                           scale=3)
                    runs_iters = gr.Number(0, label=T("more_iters"), precision=0, minimum=0, scale=2)
                    with gr.Column(scale=2, min_width=160):
                        open_btn = gr.Button(T("open"), size="sm", variant="primary")
                        resume_sel_btn = gr.Button(T("resume"), size="sm")
                    with gr.Column(scale=1, min_width=120):
                        refresh_btn = gr.Button(T("refresh"), size="sm")
                        delete_btn = gr.Button(T("delete"), size="sm", variant="stop", elem_id="nf-delete")
                with gr.Row(visible=False) as confirm_row:
                    confirm_md = gr.Markdown()
                    confirm_btn = gr.Button(T("confirm_delete"), variant="stop", size="sm")
                    cancel_btn = gr.Button(T("cancel"), size="sm")
                runs_msg = gr.Markdown()
                with gr.Accordion(T("compare"), open=False):
                    compare_sel = gr.Dropdown([], multiselect=True, label=T("compare"), elem_id="nf-compare",
                                              allow_custom_value=True)
                    compare_plot = gr.Plot(label=T("compare_plot"), format="png", elem_id="nf-compare-plot")
                with gr.Accordion(T("share"), open=False, elem_id="nf-share"):
                    gr.Markdown(T("share_intro"))
                    with gr.Row(equal_height=True):
                        repo_in = gr.Textbox(label=T("repo_id"), info=T("repo_id_info"), placeholder="user/name",
                                             elem_id="nf-repo", scale=3)
                        with gr.Column(scale=2, min_width=200):
                            private_in = gr.Checkbox(False, label=T("private"), elem_id="nf-private")
                            merged_in = gr.Checkbox(False, label=T("push_merged"), visible=False, elem_id="nf-merged")
                    # type="password": masked on screen; the value lives only in the browser and in the push request
                    token_in = gr.Textbox(label=T("hf_token"), info=T("hf_token_info"), type="password",
                                          placeholder="hf_…", elem_id="nf-token")
                    hub_cmd = gr.Textbox(hub_command("", "", False, False), label=T("hub_command"), interactive=False,
                                         max_lines=2, buttons=["copy"], elem_classes="nf-cmd", elem_id="nf-hub-cmd")
                    push_btn = gr.Button(T("push"), variant="primary", interactive=False, elem_id="nf-push")
                    push_msg = gr.Markdown(elem_id="nf-push-msg")

            with gr.Tab(T("tab_sample"), id="sample") as sample_tab:
                with gr.Row():
                    with gr.Column(scale=2):
                        model_in = gr.Dropdown([], label=T("model"), info=T("model_info"), allow_custom_value=True,
                                               elem_id="nf-model")
                        prompt = gr.Textbox("ROMEO:", label=T("prompt"), lines=3, elem_id="nf-prompt")
                        with gr.Row():
                            temperature = gr.Slider(0.0, 2.0, value=0.8, step=0.05, label=T("temperature"))
                            top_k = gr.Slider(0, 500, value=200, step=1, label=T("top_k"))
                            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label=T("top_p"))
                        with gr.Row():
                            rep = gr.Slider(1.0, 2.0, value=1.0, step=0.05, label=T("repetition_penalty"))
                            max_new = gr.Slider(1, 2000, value=300, step=1, label=T("max_new_tokens"))
                        with gr.Row():
                            sample_seed = gr.Number(1, label=T("seed"), precision=0)
                            num_samples = gr.Number(1, label=T("num_samples"), precision=0, minimum=1, maximum=8)
                        with gr.Row():
                            gen_btn = gr.Button(T("generate"), variant="primary", elem_id="nf-generate")
                            gen_stop = gr.Button(T("stop"), variant="stop")
                    with gr.Column(scale=3):
                        output = gr.Textbox(label=T("output"), lines=18, max_lines=30, buttons=["copy"],
                                            elem_id="nf-output")
                        sample_cmd = gr.Textbox(label=T("sample_command"), interactive=False, lines=2,
                                                buttons=["copy"], elem_classes="nf-cmd")

        # ----- events (explicit api names: every action can be driven from gradio_client)
        train_inputs = [preset, run_name, n_layer, n_head, n_embd, block_size, dropout, batch_size, max_iters,
                        learning_rate, eval_interval, grad_accum, warmup_iters, weight_decay, max_minutes, dtype,
                        seed, sample_prompt, threads, tokenizer, vocab_size, pretrained_tok, hf_dataset, hf_split,
                        text_column]
        assert len(train_inputs) == len(TRAIN_FIELDS)
        hparams = [n_layer, n_head, n_embd, block_size, dropout, batch_size, max_iters, learning_rate,
                   eval_interval, grad_accum, warmup_iters, weight_decay, max_minutes, dtype, seed, sample_prompt]
        poll_outputs = [loss_plot, progress, samples_box, log_box, status_md, timer]

        # The file box empties after each upload: the list of what was kept is in "Your data".
        files_in.upload(upload, [files_in, data_state, text_column], [data_state, data_md, upload_msg],
                        api_name="upload").then(lambda: None, None, files_in, api_name=False)
        add_paste_btn.click(add_text, [paste, data_state], [data_state, data_md, upload_msg], api_name="add_text")
        clear_btn.click(clear_data, data_state, [data_state, data_md, upload_msg], api_name="clear_data")
        tokenizer.change(lambda t: (gr.update(visible=t == "bpe"), gr.update(visible=t == "pretrained")),
                         tokenizer, [vocab_size, pretrained_tok], api_name=False)
        analyze_btn.click(analyze, [data_state, tokenizer, vocab_size, pretrained_tok, hf_dataset, hf_split,
                                    text_column], [stats_md, preview, data_cmd], api_name="analyze")

        preset_outputs = [preset_md, *hparams, tokenizer, vocab_size, pretrained_tok]
        # The run name is filled in after the page's defaults, from the data at that moment (an upload made while
        # the page was loading counts).
        page = demo.load(init_page, [data_state, run_state], [hw_md, preset, *preset_outputs, threads, run_state,
                                                               timer, lang_state], api_name="init")
        page = page.then(follow_data, [run_name, data_state, hf_dataset], run_name, api_name=False)
        page = page.then(command, [data_state, *train_inputs], cmd, api_name=False)
        page = page.then(param_count, [n_layer, n_head, n_embd, block_size, tokenizer, vocab_size], params_md,
                         api_name=False)
        page = page.then(poll, run_state, poll_outputs, api_name=False)
        page.then(sample_command, [model_in, prompt, temperature, top_k, top_p, rep, max_new, sample_seed,
                                   num_samples], sample_cmd, api_name=False)
        preset.input(on_preset, preset, preset_outputs, api_name="preset")
        gr.on([data_state.change, hf_dataset.change], follow_data, [run_name, data_state, hf_dataset], run_name,
              api_name=False, show_progress="hidden")
        gr.on([c.change for c in (*train_inputs, data_state)], command, [data_state, *train_inputs], cmd,
              api_name="command", show_progress="hidden", trigger_mode="always_last")
        gr.on([n_layer.change, n_head.change, n_embd.change, block_size.change, tokenizer.change, vocab_size.change],
              param_count, [n_layer, n_head, n_embd, block_size, tokenizer, vocab_size], params_md,
              api_name="params", show_progress="hidden", trigger_mode="always_last")
        measure_btn.click(measure, [data_state, lang_state, *train_inputs], [estimate_md, bench_cmd],
                          api_name="measure", concurrency_limit=1, concurrency_id="bench")

        started = start_btn.click(start, [data_state, lang_state, *train_inputs], [run_state, train_msg, timer,
                                  run_name], api_name="start", concurrency_limit=1, concurrency_id="launch")
        started.then(poll, run_state, poll_outputs, api_name=False)
        stop_btn.click(stop, run_state, train_msg, api_name="stop")
        resume_btn.click(resume, [run_state, resume_iters], [run_state, train_msg, timer], api_name="resume",
                         concurrency_limit=1, concurrency_id="launch")
        timer.tick(poll, run_state, poll_outputs, api_name="poll", show_progress="hidden")

        runs_tab.select(refresh_runs, None, [runs_df, selected, compare_sel], api_name=False)
        refresh_btn.click(refresh_runs, None, [runs_df, selected, compare_sel], api_name="runs")
        runs_df.select(select_row, runs_df, selected, api_name=False)
        open_btn.click(open_run, selected, [run_state, timer, tabs], api_name="open_run").then(
            poll, run_state, poll_outputs, api_name=False)
        resume_sel_btn.click(resume, [selected, runs_iters], [run_state, runs_msg, timer], api_name="resume_run",
                             concurrency_limit=1, concurrency_id="launch")
        delete_btn.click(confirm_delete, selected, [confirm_row, confirm_md], api_name=False)
        cancel_btn.click(lambda: gr.update(visible=False), None, confirm_row, api_name=False)
        confirm_btn.click(delete_run, selected, [runs_msg, runs_df, selected, compare_sel, confirm_row],
                          api_name="delete_run")
        compare_sel.change(compare, compare_sel, compare_plot, api_name="compare")
        share_inputs = [selected, repo_in, private_in, merged_in]
        gr.on([selected.change, runs_tab.select, refresh_btn.click], share_options, selected,
              [merged_in, push_btn, push_msg], api_name=False, show_progress="hidden")
        gr.on([c.change for c in share_inputs], hub_command, share_inputs, hub_cmd, api_name=False,
              show_progress="hidden")
        push_btn.click(push, [*share_inputs, token_in], [push_msg, hub_cmd], api_name="push",
                       concurrency_limit=1, concurrency_id="push")

        sample_inputs = [model_in, prompt, temperature, top_k, top_p, rep, max_new, sample_seed, num_samples]
        sample_tab.select(model_choices, model_in, model_in, api_name=False)
        gr.on([c.change for c in sample_inputs], sample_command, sample_inputs, sample_cmd, api_name="sample_command",
              show_progress="hidden", trigger_mode="always_last")
        gen_event = gen_btn.click(generate, sample_inputs, output, api_name="sample",
                                  concurrency_limit=s.max_concurrent_samples, concurrency_id="sample")
        gen_stop.click(None, None, None, cancels=[gen_event], api_name=False)
        gr.api(trained_runs, api_name="models")
    return demo


def estimate_text(row: dict, max_iters: int, grad_accum: int, lang: str = "en") -> str:
    """bench.py's train figure -> time per 1,000 iterations, for the whole run, and peak memory."""
    ms = row["ms_per_iter"] * max(1, grad_accum)  # bench times one micro-step; an iteration has grad_accum
    parts = [say(lang, "per_1000", t=fmt_duration(ms), ms=f"{ms:,.0f}", tok=f"{row['value']:,}")]
    if max_iters:
        parts.append(say(lang, "whole_run", n=f"{max_iters:,}", t=fmt_duration(ms * max_iters / 1000)))
    if row.get("peak_memory_mb") is not None:
        where = "GPU" if str(row.get("config", {}).get("device", "cpu")).startswith("cuda") else "RAM"
        parts.append(say(lang, "peak", where=where, mb=f"{row['peak_memory_mb']:,.0f}"))
    return " · ".join(parts)


# ---------------------------------------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description="nanoforge in the browser (Gradio).")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   help="interface to serve on; 0.0.0.0 to reach it from other machines (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)), help="default 7860")
    p.add_argument("--runs_dir", default=None,
                   help="run folders (default ./runs, or /data/runs on a Space with persistent storage)")
    p.add_argument("--uploads_dir", default=None, help="uploaded data (default: 'uploads' next to runs_dir)")
    p.add_argument("--max_concurrent_runs", type=int, default=1, help="training processes at a time (default 1)")
    p.add_argument("--max_concurrent_samples", type=int, default=2, help="generations at a time (default 2)")
    p.add_argument("--max_upload_mb", type=float, default=100, help="largest upload, and largest unpacked .zip (MB)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per training run (default: all cores but one, leaving one for the UI)")
    args = p.parse_args(argv)
    local = args.host in ("127.0.0.1", "localhost", "::1") and not os.environ.get("SPACE_ID")
    settings = Settings(args.runs_dir, args.uploads_dir, args.max_concurrent_runs, args.max_upload_mb,
                        args.max_concurrent_samples, args.threads, any_model_folder=local, server_token=local)
    settings.runs_dir.mkdir(parents=True, exist_ok=True)
    settings.uploads_dir.mkdir(parents=True, exist_ok=True)
    demo = build_ui(settings)
    print(f"nanoforge: runs in {settings.runs_dir}, uploads in {settings.uploads_dir}", flush=True)
    # allowed_paths=[]: no file on disk is served (plots, logs and samples are sent inline); unexpected errors
    # show their message only to a local user (on a shared server they could name server paths).
    demo.queue(default_concurrency_limit=4).launch(
        server_name=args.host, server_port=args.port, theme=make_theme(), css=CSS, i18n=I18N,
        max_file_size=settings.max_upload_bytes, allowed_paths=[], show_error=local)


if __name__ == "__main__":
    main()
