"""Write the built-in query-generation dataset: src/tokencredit/data/querygen/{train,test}.jsonl.

Everything here is our own writing (no data set was copied). FAMILIES below holds hand-written search
topics: each is a chain of refining queries, as a user types them one after another, with plausible result
titles a user might click after each query. A topic may have slots ({city}, {dish}, ...); each slot value
becomes one user working through the chain. From a user's chain we take 1-3 sessions: the queries so far
(with a few random clicks each) as history, the next query as target. The split is by user (~80/20), so
no user is in both files; topics do recur across users with other slot values, as in real search logs.

Deterministic: the same script and seed give byte-identical files.

    python scripts/make_querygen_data.py            # writes the files and prints their sizes
    python scripts/make_querygen_data.py --check    # fails if the files on disk differ from a fresh build
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from tokencredit.tasks.querygen import normalize_query, parse_session, render_prompt, split_sessions

SEED = 20240611
OUT_DIR = Path(__file__).resolve().parent.parent / "src" / "tokencredit" / "data" / "querygen"
MAX_PROMPT_CHARS = 470
"""Plain-text prompt budget in characters (digits count thrice): about 125 SmolLM2 tokens, 150 with its chat
template. Longer prompts lose clicks, oldest first."""
CLICKS_WEIGHTS = {0: 0.3, 1: 0.5, 2: 0.2}
"""How many results a user clicks after a query."""
SESSIONS_PER_USER_WEIGHTS = {1: 0.45, 2: 0.35, 3: 0.2}
USERS_PER_TOPIC = 3
"""A topic with slots gets this many users (fewer if it has fewer slot values); one without gets one."""
CLICK_OVERLAP_BONUS = 2.0
"""Extra click weight per word a title shares with the user's next query."""
SKIP_STEP_PROBABILITY = 0.25
"""Chance that a user of a 5-query chain skips one middle query, so histories differ between users."""

# Format: "## topic", then optional slot lines "= name: value; value" (or "= a, b: x, y; x2, y2" for slots
# that go together; several lines add up), then queries, each followed by "  - result title" lines. Slot
# values are lowercased in queries (people type lowercase) and kept as written in titles.
FAMILIES = """
## city weekend trip
= city: Lisbon; Prague; Barcelona; Vienna; Edinburgh
{city} weekend trip
  - 48 Hours in {city}: The Perfect Weekend Itinerary - Lonely Planet
  - The 25 Best Things to Do in {city} - Time Out
  - {city} Travel Guide - Rick Steves Europe
things to do in {city} in 2 days
  - How to Spend 2 Days in {city}: Itinerary for First-Timers
  - Top Things to Do in {city} (2024) - Tripadvisor
{city} 2 day itinerary walking
  - Self-Guided Walking Tour of {city} Old Town - GPSmyCity
  - {city} Itinerary: 2 Days on Foot - Culture Trip
best area to stay in {city} first time
  - Where to Stay in {city}: Best Neighborhoods for First-Timers
  - Best area to stay in {city}? : r/travel - Reddit
{city} old town hotels under 100
  - Cheap Hotels in {city} Old Town from $58 - Booking.com
  - 10 Best Budget Hotels in {city} - Tripadvisor

## domestic flights
= origin, dest: Chicago, Denver; Boston, Miami; Seattle, Las Vegas; Dallas, Orlando
cheap flights {origin} to {dest}
  - Cheap Flights from {origin} to {dest} from $79 - KAYAK
  - Find Cheap Flights from {origin} to {dest} - Google Flights
  - {origin} to {dest} Flights - Skyscanner
{origin} to {dest} nonstop flights
  - Nonstop Flights from {origin} to {dest} - Expedia
  - Direct Flights {origin} to {dest} - FlightConnections
nonstop {origin} to {dest} southwest
  - Southwest Airlines Flights from {origin} to {dest}
  - Low Fares from {origin} | Southwest Airlines
  - Southwest Carry-On Size and Baggage Rules
southwest carry on size
  - Baggage Policies | Southwest Airlines
  - Southwest Carry-On Size Limits and Personal Item Rules
  - Southwest EarlyBird Check-In: Is It Worth It? - The Points Guy
southwest early bird check in worth it
  - Is Southwest EarlyBird Check-In Worth It? - NerdWallet
  - EarlyBird Check-In | Southwest Airlines

## national park trip
= park: Yosemite; Zion; Yellowstone; Glacier
{park} national park
  - {park} National Park (U.S. National Park Service)
  - {park} National Park - Wikipedia
  - Best Time to Visit {park} - NPS
best time to visit {park}
  - Best Time to Visit {park} National Park - U.S. News Travel
  - When is the best time to visit {park}? : r/NationalPark
{park} best hikes for beginners
  - 10 Best Easy Hikes in {park} - AllTrails
  - {park} Day Hikes (U.S. National Park Service)
{park} lodging inside the park
  - Lodging - {park} National Park (U.S. National Park Service)
  - Where to Stay in {park}: Lodges, Cabins and Campgrounds
  - {park} Campground Reservations - Recreation.gov
{park} campground reservations
  - {park} Campgrounds - Recreation.gov
  - How to Get a Campsite at {park} (Even When It's Full)

## rental car road trip
= city: Denver; Phoenix; Salt Lake City
car rental {city} airport
  - Cheap Car Rentals at {city} Airport from $32/day - KAYAK
  - {city} International Airport Car Rental - Enterprise
one way car rental {city}
  - One-Way Car Rentals from {city} - Hertz
  - Cheap One Way Car Rental Deals {city} - Expedia
one way car rental drop off fee
  - How to Avoid One-Way Car Rental Fees - The Points Guy
  - Why One-Way Car Rentals Cost So Much - NerdWallet
does credit card cover rental car insurance
  - Credit Cards With Rental Car Insurance - NerdWallet
  - Do You Need Rental Car Insurance? - Forbes Advisor

## recipe
= dish: Banana Bread; Lasagna; Chicken Curry; Pancakes; Meatloaf
{dish} recipe
  - Best {dish} Recipe - Allrecipes
  - Easy {dish} Recipe - BBC Good Food
  - Classic {dish} - Sally's Baking Addiction
easy {dish} recipe with few ingredients
  - 5-Ingredient {dish} (Quick and Easy) - The Kitchn
  - The Easiest {dish} You'll Ever Make - Budget Bytes
  - How Long to Cook {dish} - Allrecipes
{dish} how long to cook
  - How Long to Cook {dish} (Times and Temperatures)
  - {dish} cooking time? : r/Cooking - Reddit
can you freeze {dish}
  - Can You Freeze {dish}? Yes - Here's How - Taste of Home
  - How to Freeze and Reheat {dish} - The Kitchn
how to reheat frozen {dish}
  - How to Reheat {dish} So It Tastes Fresh - Food Network
  - Best Way to Reheat Frozen {dish} - Allrecipes

## sourdough starter
sourdough starter
  - How to Make a Sourdough Starter from Scratch - King Arthur Baking
  - Sourdough Starter Recipe - The Perfect Loaf
sourdough starter not rising
  - Why Is My Sourdough Starter Not Rising? 8 Fixes
  - Starter not rising after 7 days : r/Sourdough - Reddit
sourdough starter feeding ratio
  - Sourdough Starter Feeding Ratios Explained - The Perfect Loaf
  - How Often to Feed Your Sourdough Starter - King Arthur Baking
  - What to Do With Sourdough Discard: Recipes - King Arthur Baking
sourdough discard recipes
  - 50+ Sourdough Discard Recipes - Little Spoon Farm
  - Easy Sourdough Discard Pancakes - King Arthur Baking
sourdough discard pancakes overnight
  - Overnight Sourdough Discard Pancakes - Farmhouse on Boone
  - Fluffy Sourdough Pancakes (Overnight Method)

## ingredient substitute
= ing, use: Buttermilk, Pancakes; Eggs, Brownies; Heavy Cream, Pasta Sauce; Brown Sugar, Cookies
{ing} substitute
  - 7 Easy Substitutes for {ing} - Healthline
  - The Best {ing} Substitutes for Baking and Cooking - Allrecipes
{ing} substitute for {use}
  - What to Use Instead of {ing} in {use} - The Kitchn
  - {ing} substitute in {use}? : r/Baking - Reddit
{ing} substitute for {use} ratio
  - How to Replace {ing}: Ratios and Tips - Serious Eats
  - {ing} Substitution Chart - King Arthur Baking
{use} recipe without {ing}
  - Easy {use} Without {ing} - Allrecipes
  - Easy {use} Recipe (No {ing}) - Budget Bytes

## meal prep
= diet: Vegetarian; High Protein; Low Carb
{diet} meal prep ideas
  - 30 {diet} Meal Prep Ideas for the Week - EatingWell
  - Easy {diet} Meal Prep Recipes - Budget Bytes
{diet} meal prep for the week on a budget
  - {diet} Meal Prep on a Budget: $50 a Week Plan
  - Cheap {diet} meal prep ideas? : r/MealPrepSunday - Reddit
{diet} meal prep grocery list
  - {diet} Grocery List (Free Printable) - Healthline
  - The Ultimate {diet} Meal Prep Shopping List
  - How Long Does Meal Prep Last in the Fridge? - EatingWell
how long does meal prep last in the fridge
  - How Long Does Meal Prep Last? Food Safety Guide - USDA
  - How Long Do Meal Prep Meals Last in the Fridge? - Healthline

## cast iron care
cast iron skillet rust
  - How to Clean a Rusty Cast Iron Skillet - Lodge Cast Iron
  - Rusty cast iron, is it ruined? : r/castiron - Reddit
how to remove rust from cast iron
  - How to Remove Rust From Cast Iron (Step by Step) - Serious Eats
  - Restoring Rusty Cast Iron - Lodge Cast Iron
how to season cast iron in oven
  - How to Season Cast Iron in the Oven - Lodge Cast Iron
  - Seasoning Cast Iron: The Complete Guide - Serious Eats
best oil to season cast iron
  - The Best Oil for Seasoning Cast Iron - Food & Wine
  - What oil do you use for seasoning? : r/castiron - Reddit
cast iron seasoning flaking off
  - Why Is My Cast Iron Seasoning Flaking? - Lodge Cast Iron
  - Seasoning flaking after oven seasoning : r/castiron - Reddit

## grilling
= meat: Steak; Pork Chops; Chicken Thighs; Salmon
{meat} on the grill
  - How to Grill {meat} Perfectly - Weber
  - Grilled {meat} Recipe - Allrecipes
how long to grill {meat}
  - How Long to Grill {meat}: Time and Temperature Chart
  - Grilling Times for {meat} - Traeger
{meat} internal temperature
  - Safe Minimum Internal Temperatures - FoodSafety.gov
  - {meat} Internal Temp Guide - ThermoWorks
  - Easy {meat} Marinade for the Grill - Weber
{meat} marinade easy
  - The Best {meat} Marinade - Allrecipes
  - Easy {meat} Marinade (5 Ingredients) - Simply Recipes

## symptoms
= cond: Sore Throat; Ear Infection; Pink Eye; Sinus Infection
{cond} symptoms
  - {cond}: Symptoms and Causes - Mayo Clinic
  - {cond} - NHS
  - {cond}: Symptoms, Causes and Treatment - Cleveland Clinic
  - How Long Does {cond} Last in Adults? - Cleveland Clinic
{cond} in adults how long does it last
  - How Long Does {cond} Last in Adults? - Healthline
  - {cond} in Adults - WebMD
{cond} home remedies
  - 12 Home Remedies for {cond} - Healthline
  - {cond}: Self-Care at Home - Mayo Clinic
  - When to See a Doctor for {cond} - Mayo Clinic
when to see a doctor for {cond}
  - When to See a Doctor for {cond} - Cleveland Clinic
  - {cond}: When to Get Medical Help - NHS
is {cond} contagious
  - Is {cond} Contagious? How Long and How It Spreads
  - {cond}: Is It Contagious? - Medical News Today

## medication dosage
= drug: Ibuprofen; Acetaminophen; Cetirizine; Naproxen
{drug} dosage adults
  - {drug} Dosage Guide + Max Dose, Adjustments - Drugs.com
  - {drug}: Medicine to Relieve Pain - NHS
{drug} max dose per day
  - Maximum Daily Dose of {drug} - Drugs.com
  - How Much {drug} Can I Take in a Day? - Healthline
can you take {drug} on an empty stomach
  - Should {drug} Be Taken With Food? - Drugs.com
  - Taking {drug} on an Empty Stomach - GoodRx
  - {drug} Side Effects and Long-Term Risks - Drugs.com
{drug} side effects long term
  - {drug} Side Effects: Common, Severe, Long Term - Drugs.com
  - Long-Term Use of {drug}: Risks - Mayo Clinic

## lower back pain
lower back pain when sitting
  - Lower Back Pain When Sitting: Causes and Relief - Healthline
  - Back Pain - Symptoms and Causes - Mayo Clinic
lower back pain from sitting all day exercises
  - 7 Exercises for Lower Back Pain From Sitting - Healthline
  - Exercises for Sitting-Related Back Pain - Cleveland Clinic
stretches for lower back pain at desk
  - 10 Desk Stretches for Lower Back Pain - Verywell Health
  - Simple Stretches You Can Do at Your Desk - NHS
best office chair for lower back pain
  - The Best Office Chairs for Back Pain of 2024 - Wirecutter
  - Best office chair for lower back pain? : r/OfficeChairs

## sleep
cant fall asleep at night
  - Insomnia - Symptoms and Causes - Mayo Clinic
  - Can't Sleep? 20 Tips to Fall Asleep - Sleep Foundation
how to fall asleep faster
  - 20 Simple Ways to Fall Asleep Fast - Healthline
  - How to Fall Asleep Faster - Sleep Foundation
military sleep method
  - The Military Method: Fall Asleep in 2 Minutes - Healthline
  - Does the military sleep method work? : r/sleep - Reddit
  - Magnesium for Sleep: Does It Help? - Healthline
magnesium glycinate for sleep dosage
  - Magnesium for Sleep: Dosage and Best Type - Sleep Foundation
  - Magnesium Glycinate Dosage for Sleep - Healthline

## vitamin deficiency
= vit: Vitamin D; Iron; Vitamin B12
{vit} deficiency symptoms
  - {vit} Deficiency: Symptoms and Causes - Cleveland Clinic
  - {vit} Deficiency - NHS
{vit} deficiency tiredness
  - Can Low {vit} Make You Tired? - Healthline
  - {vit} and Fatigue - Harvard Health
  - {vit} Blood Test Normal Range - MedlinePlus
{vit} blood test normal range
  - {vit} Test: Normal Range and Results - MedlinePlus
  - {vit} Blood Test - Lab Tests Online
  - Best Time to Take {vit} Supplements - Healthline
best time to take {vit} supplement
  - When Is the Best Time to Take {vit}? - Healthline
  - {vit} Supplements: How and When to Take Them - GoodRx

## running plan
= race: 5K; 10K; Half Marathon
{race} training plan beginner
  - {race} Training Plan for Beginners - Runner's World
  - Beginner {race} Training Schedule - Hal Higdon
{race} training plan 8 weeks
  - 8-Week {race} Training Plan (Free PDF)
  - 8 Week {race} Plan - Nike Run Club
how many miles a week for {race} training
  - How Many Miles Per Week to Train for a {race}? - Runner's World
  - Weekly mileage for a first {race}? : r/running - Reddit
best running shoes for {race} beginners
  - Best Running Shoes for Beginners 2024 - Runner's World
  - The Best Running Shoes for a {race} - RunRepeat

## exercise form
= ex: Squat; Deadlift; Bench Press
how to {ex} proper form
  - How to {ex} With Proper Form - Verywell Fit
  - {ex} Technique Guide - Stronger by Science
{ex} form mistakes
  - 7 Common {ex} Mistakes and How to Fix Them - Men's Health
  - {ex} form check? : r/formcheck - Reddit
  - {ex} Mistakes That Cause Lower Back Pain - Healthline
{ex} lower back pain
  - Lower Back Hurts After {ex}? Causes and Fixes - Healthline
  - Lower back pain after {ex} : r/weightroom - Reddit
  - {ex} Alternatives at Home for Back Pain - Garage Gym Reviews
{ex} alternatives at home
  - 9 {ex} Alternatives You Can Do at Home - Garage Gym Reviews
  - Best {ex} Alternatives Without Equipment - Healthline

## wifi trouble
= dev: Laptop; iPhone; PS5; Smart TV
{dev} wont connect to wifi
  - {dev} Won't Connect to Wi-Fi? 10 Ways to Fix It
  - Fix Wi-Fi Connection Issues - Microsoft Support
  - If your device won't connect to Wi-Fi - Apple Support
{dev} connected to wifi but no internet
  - Connected to Wi-Fi but No Internet: 9 Fixes - How-To Geek
  - {dev} says connected but no internet : r/techsupport
  - Fix It by Resetting Network Settings on Your {dev} - Lifewire
reset network settings {dev}
  - How to Reset Network Settings on Your {dev} - Lifewire
  - Reset Network Settings: What It Does - Digital Trends
{dev} wifi keeps disconnecting
  - Why Does My {dev} Keep Disconnecting From Wi-Fi?
  - {dev} Wi-Fi Keeps Dropping: How to Fix It - Tom's Guide

## windows update stuck
windows 11 update stuck at 0
  - Windows 11 Update Stuck at 0%? Here's How to Fix It
  - Update stuck at 0% - Microsoft Community
windows update stuck downloading 0%
  - Fix Windows Update Stuck Downloading - Windows Report
  - Troubleshoot problems updating Windows - Microsoft Support
windows update troubleshooter
  - Windows Update Troubleshooter - Microsoft Support
  - How to Run the Windows Update Troubleshooter - How-To Geek
reset windows update components command
  - How to Reset Windows Update Components - Microsoft Learn
  - Reset Windows Update Components Using Command Prompt
windows update error 0x80070002
  - Fix Windows Update Error 0x80070002 - Microsoft Support
  - Error 0x80070002 when installing updates : r/WindowsHelp

## printer offline
= brand: HP; Canon; Epson; Brother
{brand} printer offline
  - Fix {brand} Printer Offline Status - {brand} Support
  - Why Is My {brand} Printer Offline? 6 Fixes - Lifewire
{brand} printer offline windows 11 fix
  - {brand} Printer Offline in Windows 11: How to Fix It
  - Printer shows offline Windows 11 - Microsoft Community
{brand} printer driver download
  - {brand} Drivers and Software Downloads - {brand} Support
  - Download {brand} Printer Drivers for Windows 11
{brand} printer wifi setup
  - How to Connect a {brand} Printer to Wi-Fi - {brand} Support
  - {brand} Wireless Printer Setup Guide - Lifewire

## phone battery
= phone: iPhone 13; Pixel 7; Galaxy S22
{phone} battery draining fast
  - {phone} Battery Draining Fast? 12 Ways to Fix It
  - Why Is My {phone} Battery Dying So Fast? - Tom's Guide
{phone} battery drain after update
  - {phone} Battery Drain After Update: Fixes - 9to5Mac
  - Battery drain after latest update? : r/techsupport - Reddit
{phone} battery health check
  - How to Check Battery Health on {phone} - Android Authority
  - Check {phone} Battery Health - Support
{phone} battery replacement cost
  - {phone} Battery Replacement Cost and Options - iFixit
  - How Much Does a {phone} Battery Replacement Cost?

## excel formulas
= fn: VLOOKUP; SUMIF; COUNTIF; INDEX MATCH
excel {fn}
  - {fn} Function - Microsoft Support
  - How to Use {fn} in Excel - Exceljet
excel {fn} example
  - Excel {fn} Examples (Step by Step) - Ablebits
  - {fn} in Excel: Easy Tutorial - Excel Easy
excel {fn} not working
  - {fn} Not Working? 7 Reasons Why - Exceljet
  - {fn} returns 0 or #N/A : r/excel - Reddit
excel {fn} multiple criteria
  - Excel {fn} With Multiple Criteria - Ablebits
  - How to {fn} With Multiple Criteria - Exceljet

## gmail storage full
gmail storage full
  - Your Google storage is full - Google One Help
  - Gmail Storage Full? How to Free Up Space - Lifewire
how to delete large emails in gmail
  - How to Find and Delete Large Emails in Gmail - How-To Geek
  - Clear Gmail storage - Gmail Help
  - Search Gmail for Emails Larger Than 10MB - Gmail Help
gmail search emails larger than 10mb
  - Search operators you can use with Gmail - Gmail Help
  - Gmail: Find Emails by Size (larger:10M) - Tech Junkie
google one storage plans price
  - Google One: Plans and Pricing
  - Is Google One worth it? : r/google - Reddit

## slow computer
= dev: Windows 10 Laptop; MacBook Air; Chromebook
{dev} running slow
  - Why Is My {dev} So Slow? 10 Ways to Speed It Up
  - Tips to improve PC performance - Microsoft Support
{dev} running slow after update
  - {dev} Slow After Update? Try These Fixes - Lifewire
  - {dev} super slow since update : r/techsupport
how to speed up {dev}
  - 15 Ways to Speed Up Your {dev} - PCMag
  - How to Speed Up an Old {dev} - Tom's Guide
{dev} disable startup apps
  - How to Disable Startup Apps on {dev} - How-To Geek
  - Change which apps run at startup - Support

## account recovery
= svc: Instagram; Facebook; Apple ID; Microsoft Account
forgot {svc} password
  - Reset Your {svc} Password - Help Center
  - How to Reset Your {svc} Password - Lifewire
{svc} password reset email not received
  - Not Getting {svc} Password Reset Email? Try This
  - Didn't receive reset email - {svc} Community
  - Recover Your {svc} Account Without Email or Phone
{svc} recover account without email or phone
  - How to Recover {svc} Account Without Email or Phone
  - Account recovery - {svc} Help Center
  - {svc} Two-Factor Authentication: Lost Phone Recovery
{svc} two factor authentication lost phone
  - Lost Phone With Two-Factor Authentication On - {svc} Help
  - Locked out of {svc} after losing phone : r/techsupport

## python sort
python list sort
  - Python List sort() Method - W3Schools
  - Sorting HOW TO - Python 3 Documentation
python sort list of dicts by key
  - How to Sort a List of Dictionaries by a Value - Stack Overflow
  - Sort a List of Dictionaries in Python - GeeksforGeeks
python sorted lambda key reverse
  - Python sorted() Function - W3Schools
  - Sort list in descending order with lambda - Stack Overflow
python sort by two keys
  - Sort a Python List by Two Fields - Stack Overflow
  - Sorting by Multiple Keys in Python - Real Python

## git undo
git undo last commit
  - How Do I Undo the Most Recent Local Commits in Git? - Stack Overflow
  - Undoing Changes in Git - Atlassian Git Tutorial
git undo last commit keep changes
  - Undo Last Commit but Keep Changes - Stack Overflow
  - git reset --soft HEAD~1 Explained - freeCodeCamp
git reset soft vs hard
  - What's the Difference Between git reset --mixed, --soft, and --hard?
  - Git Reset - Git Documentation
git undo pushed commit
  - How to Undo a Pushed Commit with git revert - Stack Overflow
  - Git Revert vs Reset - Atlassian Git Tutorial

## json parsing
= lang: JavaScript; Python; Java; Go
{lang} read json file
  - How to Read a JSON File in {lang} - Stack Overflow
  - Working With JSON Data in {lang} - Real Python
{lang} parse json string to object
  - Parse JSON String Into an Object in {lang} - Stack Overflow
  - JSON Parsing in {lang} - GeeksforGeeks
{lang} json pretty print
  - Pretty Print JSON in {lang} - Stack Overflow
  - How to Pretty-Print JSON in {lang} - Baeldung
{lang} json parse error unexpected token
  - Unexpected Token in JSON at Position 0 - Stack Overflow
  - Debugging JSON Parse Errors in {lang} - DEV Community

## sql joins
sql join two tables
  - SQL Joins - W3Schools
  - SQL JOIN: How to Join Tables - Mode Analytics
sql left join vs inner join
  - What Is the Difference Between INNER JOIN and LEFT JOIN - Stack Overflow
  - SQL LEFT JOIN vs INNER JOIN Explained - LearnSQL.com
sql left join multiple tables
  - How to LEFT JOIN Multiple Tables in SQL - LearnSQL.com
  - SQL Left Join Three Tables - Stack Overflow
sql left join where column is null
  - Find Rows With No Match Using LEFT JOIN and IS NULL - Stack Overflow
  - SQL Anti Join Explained - LearnSQL.com

## docker container exits
docker container exits immediately
  - Docker Container Exits Immediately - Stack Overflow
  - Why Does My Docker Container Stop Right Away? - Baeldung
docker run keep container running
  - How to Keep a Docker Container Running - Stack Overflow
  - docker run - Docker Docs
  - Docker Compose restart: always Policy - Docker Docs
docker compose restart always
  - Start Containers Automatically - Docker Docs
  - restart: always vs unless-stopped - Stack Overflow
docker compose logs follow
  - docker compose logs - Docker Docs
  - How to View Docker Compose Logs in Real Time

## best product
= item: Robot Vacuum; Air Fryer; Standing Desk; Stand Mixer; Cordless Drill
best {item} 2024
  - The Best {item}s of 2024 - Wirecutter
  - Best {item} 2024: Tested and Rated - Tom's Guide
  - Best {item}? : r/BuyItForLife - Reddit
best {item} under 200
  - Best {item}s Under $200 - RTINGS.com
  - The Best Budget {item}s We've Tested - CNET
{item} reviews consumer reports
  - Best {item}s - Consumer Reports
  - {item} Ratings and Buying Guide - Consumer Reports
{item} black friday deals
  - Best Black Friday {item} Deals 2024 - Tom's Guide
  - {item} Deals - Amazon.com

## store returns
= store: Amazon; Target; Costco; Walmart
{store} return policy
  - Return Policy - {store} Help
  - {store} Return Policy Explained - The Krazy Coupon Lady
{store} return policy without receipt
  - Can You Return to {store} Without a Receipt? - GOBankingRates
  - Returned without receipt at {store} : r/Frugal - Reddit
{store} return policy electronics
  - {store} Electronics Return Policy: Time Limits - Help
  - How Long Do You Have to Return Electronics to {store}?
  - {store} Return Drop Off Locations Near Me
{store} return drop off near me
  - Find a {store} Return Drop Off Location
  - Where Can I Drop Off {store} Returns?

## tv shopping
= size, label: 55 inch, 55-Inch; 65 inch, 65-Inch; 75 inch, 75-Inch
{size} tv deals
  - {label} TV Deals - Best Buy
  - Best {label} TV Deals This Week - Tom's Guide
best {size} tv for gaming
  - Best {label} TVs for Gaming - RTINGS.com
  - The Best Gaming TVs 2024 - IGN
{size} oled vs qled
  - OLED vs QLED: Which TV Should You Buy? - CNET
  - OLED vs QLED for a {label} TV : r/4kTV - Reddit
how far to sit from a {size} tv
  - TV Size to Distance Calculator - RTINGS.com
  - How Far Should You Sit From a {label} TV?

## mattress
= kind: Memory Foam; Hybrid; Latex
best {kind} mattress
  - The Best {kind} Mattresses of 2024 - Sleep Foundation
  - Best {kind} Mattress - Wirecutter
{kind} mattress for back pain
  - Best {kind} Mattresses for Back Pain - Sleep Foundation
  - Is a {kind} mattress good for back pain? : r/Mattress
{kind} mattress sleeping hot
  - Does {kind} Sleep Hot? How to Stay Cool - Sleepopolis
  - {kind} mattress too hot : r/Mattress - Reddit
cooling mattress topper for {kind} mattress
  - The Best Cooling Mattress Toppers of 2024 - Wirecutter
  - Best Cooling Topper for a {kind} Bed - Sleep Foundation

## tax deadline
when are taxes due 2024
  - When Are Taxes Due in 2024? - NerdWallet
  - IRS Tax Filing Deadline - IRS
tax extension deadline 2024
  - Get an Extension to File Your Tax Return - IRS
  - Tax Extension Deadline 2024: How to File - TurboTax
how to file tax extension online free
  - Free File: Request an Extension - IRS
  - How to File a Tax Extension for Free - Forbes Advisor
  - Form 4868 Free File Extension - IRS
irs form 4868
  - About Form 4868, Application for Automatic Extension - IRS
  - Form 4868 Instructions - TurboTax
does a tax extension extend time to pay
  - Extension of Time to File vs Time to Pay - IRS
  - Does a Tax Extension Give You More Time to Pay? - NerdWallet

## credit score
how to raise credit score fast
  - How to Raise Your Credit Score Fast - NerdWallet
  - 11 Ways to Improve Your Credit Score - Experian
how much does credit utilization affect credit score
  - What Is a Credit Utilization Rate? - Experian
  - Credit Utilization Ratio Explained - NerdWallet
  - Pay Your Card Before the Statement Date to Lower Utilization - CNBC
should i pay off credit card before statement date
  - Pay Before the Statement Date to Boost Your Score? - CNBC
  - Paying before statement date? : r/CreditCards - Reddit
credit card statement date vs due date
  - Statement Date vs Due Date: What's the Difference? - Experian
  - Credit Card Statement Closing Date vs Due Date - Chase

## savings accounts
= acct, label: high yield savings account, High-Yield Savings Account; cd, CD
= acct, label: money market account, Money Market Account
{acct} rates
  - Best {label} Rates for June 2024 - Bankrate
  - Current {label} Rates - NerdWallet
best {acct} rates today
  - Today's Best {label} Rates - Forbes Advisor
  - Best {label} Rates: Up to 5.30% APY - CNBC Select
is a {acct} worth it
  - Is a {label} Worth It? Pros and Cons - Investopedia
  - Is a {label} worth it right now? : r/personalfinance
{acct} taxes on interest
  - How Is Interest on a {label} Taxed? - SmartAsset
  - Do You Pay Taxes on {label} Interest? - Bankrate

## mortgage affordability
mortgage calculator
  - Mortgage Calculator - NerdWallet
  - Mortgage Calculator with PMI and Taxes - Bankrate
mortgage calculator with taxes and insurance
  - Mortgage Calculator With Taxes and Insurance - SmartAsset
  - PITI Mortgage Calculator - Zillow
  - How Much House Can I Afford? Calculator by Salary - NerdWallet
how much house can i afford on 80k salary
  - How Much House Can I Afford on $80,000 a Year? - Rocket Mortgage
  - Home Affordability Calculator - NerdWallet
  - The 28/36 Rule: How Much House Can You Afford? - Investopedia
28/36 rule mortgage
  - What Is the 28/36 Rule? - Investopedia
  - The 28/36 Rule of Mortgage Affordability - Rocket Mortgage

## retirement accounts
= acct, label: roth ira, Roth IRA; 401k, 401(k); traditional ira, Traditional IRA
{acct} contribution limit 2024
  - {label} Contribution Limits for 2024 - IRS
  - 2024 {label} Limits: What You Can Contribute - Fidelity
{acct} contribution deadline
  - {label} Contribution Deadline - Charles Schwab
  - When Is the {label} Contribution Deadline? - NerdWallet
{acct} withdrawal rules
  - {label} Withdrawal Rules - Fidelity
  - {label} Withdrawals: Rules and Penalties - Investopedia
{acct} early withdrawal penalty exceptions
  - Exceptions to Tax on Early Distributions - IRS
  - {label} Early Withdrawal: 10% Penalty Exceptions - NerdWallet

## budgeting
how to make a budget
  - How to Make a Budget in 5 Steps - NerdWallet
  - Budgeting 101: How to Budget Money - Ramsey
  - The 50/30/20 Budget Rule - NerdWallet
50/30/20 budget rule
  - The 50/30/20 Budget Rule Explained - Investopedia
  - Using the 50/30/20 Rule - NerdWallet
50/30/20 budget template google sheets
  - Free 50/30/20 Budget Template for Google Sheets
  - 50/30/20 spreadsheet template : r/personalfinance - Reddit
best budgeting apps free
  - The Best Budgeting Apps for 2024 - NerdWallet
  - Best free budgeting app? : r/personalfinance - Reddit

## college essay
common app essay prompts 2024
  - 2024-2025 Common App Essay Prompts - Common App
  - Common App Essay Prompts and How to Choose - Princeton Review
common app essay word limit
  - Common App Essay Length: 650 Words - College Essay Guy
  - How Long Should the Common App Essay Be? - PrepScholar
common app essay examples that worked
  - 20 Common App Essay Examples That Worked - College Essay Guy
  - Essays That Worked - Johns Hopkins Admissions
how to start a college essay
  - How to Start a College Essay: 9 Hook Examples - Scribbr
  - How to Start a College Essay - Princeton Review

## fafsa
fafsa deadline 2024
  - FAFSA Deadlines - Federal Student Aid
  - 2024-25 FAFSA Deadline: What to Know - NerdWallet
fafsa deadline by state
  - State FAFSA Deadlines - Federal Student Aid
  - FAFSA State Deadlines 2024-25 - Sallie Mae
  - FAFSA Parent Information for Divorced Parents - Federal Student Aid
fafsa parent information divorced
  - Reporting Parent Information on the FAFSA - Federal Student Aid
  - FAFSA for Children of Divorced Parents - Savingforcollege.com
fafsa which parent to use
  - Which Parent Should Fill Out the FAFSA? - Federal Student Aid
  - FAFSA parent rules changed? : r/financialaid - Reddit

## math homework
= topic: Quadratic Equations; Derivatives; Fractions; Logarithms
how to solve {topic}
  - How to Solve {topic} - Khan Academy
  - Solving {topic} (Step by Step) - Math is Fun
{topic} step by step
  - {topic} Calculator - Step by Step - Symbolab
  - {topic} Explained Step by Step - Mathway
  - {topic} Practice Problems With Answers - Khan Academy
{topic} practice problems with answers
  - {topic} Practice Problems With Answers (PDF)
  - {topic} Worksheet With Solutions - Kuta Software
{topic} khan academy
  - {topic} | Khan Academy
  - Intro to {topic} (video) | Khan Academy

## learn a language
= lang: Spanish; French; Japanese; German
learn {lang} fast
  - How to Learn {lang} Fast: 12 Tips - FluentU
  - Fastest way to learn {lang}? : r/languagelearning
best app to learn {lang}
  - The Best Apps to Learn {lang} in 2024 - PCMag
  - Best app for {lang}? : r/languagelearning - Reddit
  - Duolingo {lang} Review 2024 - PCMag
duolingo {lang} review
  - Duolingo {lang} Review: Is It Worth It? - All Language Resources
  - Honest Duolingo {lang} review : r/duolingo - Reddit
{lang} podcast for beginners
  - 15 Best {lang} Podcasts for Beginners - FluentU
  - Coffee Break {lang} - Podcast

## citation style
= style: APA; MLA; Chicago
{style} citation website
  - How to Cite a Website in {style} - Scribbr
  - {style} Website Citation - Purdue OWL
{style} citation website no author
  - How to Cite a Website With No Author in {style} - Scribbr
  - {style}: No Author - Purdue OWL
{style} in-text citation no author
  - {style} In-Text Citations With No Author - Scribbr
  - In-Text Citations: The Basics - Purdue OWL
{style} citation generator
  - Free {style} Citation Generator - Scribbr
  - {style} Citation Generator - Citation Machine

## resume
= job: Software Engineer; Nurse; Teacher; Data Analyst
{job} resume
  - {job} Resume: How to Write One - Indeed.com
  - {job} Resume Template - Zety
{job} resume examples
  - 20 {job} Resume Examples for 2024 - Resume Worded
  - {job} Resume Example - Indeed.com
{job} resume skills section
  - Top Skills for a {job} Resume - Indeed.com
  - What Skills to Put on a {job} Resume - Zety
{job} cover letter example
  - {job} Cover Letter Example - Indeed.com
  - {job} Cover Letter Template - Resume Genius

## job interview
tell me about yourself interview answer
  - How to Answer "Tell Me About Yourself" - Indeed.com
  - Tell Me About Yourself: Best Answers - The Muse
tell me about yourself answer example
  - 10 "Tell Me About Yourself" Answer Examples - Indeed.com
  - Tell Me About Yourself Sample Answers - Glassdoor
greatest weakness interview answer
  - What Is Your Greatest Weakness? Best Answers - Indeed.com
  - How to answer the greatest weakness question : r/jobs
  - Questions to Ask at the End of an Interview - Indeed.com
questions to ask at the end of an interview
  - 30 Questions to Ask at the End of an Interview - The Muse
  - Good Questions to Ask an Interviewer - Indeed.com

## salary and career
= job: Registered Nurse; Electrician; UX Designer; Dental Hygienist
{job} salary
  - {job} Salary in the United States - Indeed.com
  - {job} Salary - Glassdoor
{job} salary by state
  - {job} Salary by State 2024 - ZipRecruiter
  - Occupational Employment and Wages: {job} - BLS
{job} salary texas
  - {job} Salary in Texas - Indeed.com
  - {job} Salary, Texas - ZipRecruiter
  - How to Become a {job} in Texas - Indeed.com
how to become a {job}
  - How to Become a {job}: Steps and Requirements - Indeed.com
  - {job}s: Occupational Outlook Handbook - BLS

## unemployment benefits
= state: California; New York; Florida
file for unemployment {state}
  - File an Unemployment Claim - {state} Department of Labor
  - How to File for Unemployment in {state} - Nolo
{state} unemployment eligibility
  - Unemployment Insurance Eligibility - {state}
  - Who Qualifies for Unemployment in {state}? - Nolo
{state} unemployment weekly certification
  - Certify for Weekly Benefits - {state} Unemployment
  - How to Certify for Unemployment in {state}
{state} unemployment payment pending
  - Why Is My {state} Unemployment Claim Pending?
  - Payment pending for weeks : r/Unemployment - Reddit

## dripping faucet
kitchen faucet dripping
  - How to Fix a Dripping Faucet - The Home Depot
  - Why Is My Kitchen Faucet Dripping? - Family Handyman
how to fix a dripping kitchen faucet single handle
  - Fix a Leaky Single-Handle Faucet - Family Handyman
  - Single Handle Kitchen Faucet Repair - This Old House
  - Moen Single-Handle Faucet Cartridge Replacement - Moen
moen cartridge replacement
  - How to Replace a Moen Faucet Cartridge - Moen
  - Moen Cartridge Replacement Guide - The Spruce
moen 1225 cartridge stuck
  - How to Remove a Stuck Moen 1225 Cartridge - Moen
  - Moen cartridge won't come out : r/Plumbing - Reddit

## running toilet
toilet keeps running
  - How to Fix a Running Toilet - The Home Depot
  - Running Toilet Repair - Family Handyman
toilet keeps running after flush
  - Toilet Keeps Running After Flushing: 5 Fixes - The Spruce
  - Toilet runs after flush, new flapper? : r/Plumbing
replace toilet flapper
  - How to Replace a Toilet Flapper - This Old House
  - Toilet Flapper Replacement - Lowe's
  - 2 Inch vs 3 Inch Toilet Flapper Size - Korky
toilet flapper size 2 or 3 inch
  - How to Tell If Your Toilet Needs a 2 or 3 Inch Flapper
  - Toilet Flapper Sizes Explained - Korky

## drywall repair
hole in drywall
  - How to Repair a Hole in Drywall - The Home Depot
  - Drywall Repair: Patch Any Hole - Family Handyman
how to patch a large hole in drywall
  - How to Patch a Large Hole in Drywall - This Old House
  - Fix a Big Hole in Drywall - Bob Vila
  - Drywall Patch Kit vs Mesh Tape - Family Handyman
drywall patch kit vs mesh tape
  - Drywall Patch Kits vs Mesh Tape: Which to Use? - The Spruce
  - Mesh patch or cut in a new piece? : r/HomeImprovement
  - How Long Does Spackle Take to Dry Before Painting?
how long does spackle take to dry before painting
  - How Long Does Spackle Take to Dry? - Bob Vila
  - Spackle Drying Time Before Painting - The Spruce

## painting a room
= room: Bedroom; Bathroom; Living Room; Home Office
how to paint a {room}
  - How to Paint a {room} Like a Pro - Bob Vila
  - How to Paint a {room} - The Home Depot
best paint for {room} walls
  - The Best Paint for {room} Walls - The Spruce
  - Best Interior Paint 2024 - Consumer Reports
  - Paint Finish Guide: Satin or Eggshell? - Sherwin-Williams
{room} paint finish satin or eggshell
  - Satin vs Eggshell: Which Finish for a {room}? - Sherwin-Williams
  - Satin or eggshell for a {room}? : r/HomeImprovement
how much paint do i need for a {room}
  - Paint Calculator - Benjamin Moore
  - How Much Paint Do You Need for a {room}? - Lowe's

## appliance not working
= app: Furnace; AC Unit; Water Heater; Dishwasher
{app} not turning on
  - {app} Not Turning On? 8 Things to Check - The Spruce
  - {app} Won't Turn On: Troubleshooting - Family Handyman
{app} not turning on reset button
  - Where Is the Reset Button on Your {app}? - Bob Vila
  - How to Reset a {app} - The Home Depot
{app} troubleshooting guide
  - {app} Troubleshooting Guide - Repair Clinic
  - {app} Problems and Fixes - This Old House
  - {app} Replacement Cost vs Repair - HomeGuide
{app} replacement cost
  - {app} Replacement Cost 2024 - HomeGuide
  - How Much Does a New {app} Cost? - Angi

## sports tickets
= team, venue: Chicago Cubs, Wrigley Field; Boston Celtics, TD Garden; Green Bay Packers, Lambeau Field
{team} schedule
  - {team} Schedule 2024 - ESPN
  - {team} Schedule, Results - CBS Sports
{team} tickets
  - {team} Tickets - Ticketmaster
  - {team} Tickets - StubHub
{team} tickets cheapest
  - Cheapest {team} Tickets - SeatGeek
  - How to Get Cheap {team} Tickets - TickPick
  - {venue} Seating Chart, Tickets and Parking - SeatGeek
{venue} parking
  - {venue} Parking Guide - SpotHero
  - Parking and Directions - {venue}

## racket sports
= sport, gear: Pickleball, Paddle; Tennis, Racket; Padel, Racket; Badminton, Racket
how to play {sport}
  - How to Play {sport}: A Beginner's Guide - Wikipedia
  - {sport} for Beginners - USA {sport}
{sport} rules for beginners
  - {sport} Rules: The Basics - USA {sport}
  - Learn the Rules of {sport} in 5 Minutes - YouTube
  - {sport} Scoring Explained for Beginners - USA {sport}
{sport} scoring explained
  - {sport} Scoring Explained Simply - The Athletic
  - How does {sport} scoring work? : r/{sport} - Reddit
best {sport} {gear} for beginners
  - Best {sport} {gear}s for Beginners 2024 - Tom's Guide
  - Best beginner {gear}? : r/{sport} - Reddit

## fantasy football
fantasy football rankings
  - Fantasy Football Rankings 2024 - ESPN
  - Fantasy Football Rankings - FantasyPros
fantasy football ppr rankings week 1
  - Week 1 PPR Rankings - FantasyPros
  - Fantasy Football Week 1 PPR Rankings - CBS Sports
  - Fantasy Football Draft Strategy for 12-Team Leagues - ESPN
fantasy football draft strategy 12 team league
  - 12-Team Draft Strategy - FantasyPros
  - Draft strategy for a 12 team PPR league : r/fantasyfootball
fantasy football sleepers 2024
  - Fantasy Football Sleepers 2024 - ESPN
  - Sleepers to Target in Your Draft - The Athletic

## tv show
= show: The Bear; Stranger Things; The Last of Us; Severance
{show} new season
  - {show} Season 3: Everything We Know - Variety
  - {show} - IMDb
{show} new season release date
  - {show} Release Date, Cast and Plot - Radio Times
  - When Does {show} Come Back? - Collider
where to watch {show}
  - Watch {show} | Streaming Online - JustWatch
  - {show}: Where to Stream - Rotten Tomatoes
{show} cast
  - {show} (TV Series) - Full Cast and Crew - IMDb
  - {show} Cast: Who's Who - Collider
{show} ending explained
  - {show} Finale Ending Explained - Screen Rant
  - {show} ending discussion : r/television - Reddit

## movie night
= movie: Dune Part Two; Oppenheimer; Inside Out 2; Wicked
{movie} showtimes near me
  - {movie} Showtimes and Tickets - Fandango
  - {movie} - AMC Theatres
{movie} runtime
  - {movie} (2024) - IMDb
  - How Long Is {movie}? Runtime and Bathroom Break - Collider
{movie} streaming release date
  - When Will {movie} Be on Streaming? - Forbes
  - {movie} Digital Release Date - Screen Rant
{movie} ending explained
  - {movie} Ending Explained - Screen Rant
  - {movie} Ending, Explained - Vulture

## video game help
= game: Elden Ring; Zelda Tears of the Kingdom; Baldur's Gate 3; Hollow Knight
{game} beginner tips
  - 25 Beginner Tips for {game} - IGN
  - {game} tips for new players : r/gaming - Reddit
{game} best weapons early
  - Best Early Weapons in {game} - Game Rant
  - {game} Best Early Game Weapons - Fextralife Wiki
{game} best weapons early location
  - Where to Find the Best Early Weapons in {game} - PC Gamer
  - {game} Weapon Locations Map - IGN
{game} how to upgrade weapons
  - How to Upgrade Weapons in {game} - Polygon
  - {game} Upgrade Materials Guide - Fextralife Wiki

## concert tickets
= artist: Taylor Swift; Coldplay; Bruce Springsteen; Olivia Rodrigo
{artist} tour 2024
  - {artist} Tour Dates 2024 - Songkick
  - {artist} Official Site - Tour
{artist} tour 2024 tickets
  - {artist} Tickets - Ticketmaster
  - {artist} Tour Tickets - StubHub
{artist} tickets resale price
  - Why Are {artist} Resale Tickets So Expensive? - CNBC
  - {artist} ticket prices on resale sites : r/concerts
{artist} setlist
  - {artist} Setlist - setlist.fm
  - {artist} Tour Setlist: Every Song - Billboard

## books
= genre: Fantasy; Thriller; Historical Fiction
best {genre} books
  - The 100 Best {genre} Books of All Time - Goodreads
  - Best {genre} Books Everyone Should Read - Penguin
best {genre} books 2023
  - The Best {genre} Books of 2023 - NPR
  - Best {genre} of 2023 : r/books - Reddit
  - Best {genre} Book Series for Adults - Goodreads
{genre} book series for adults
  - 25 {genre} Book Series for Adults - Book Riot
  - Best {genre} Series for Adults - Goodreads
  - Free {genre} Audiobooks on Libby - OverDrive
{genre} audiobooks free libby
  - How to Borrow Free Audiobooks With Libby - OverDrive
  - Best {genre} Audiobooks on Libby - Book Riot

## local trades
= trade: Plumber; Electrician; Locksmith; Roofer
{trade} near me
  - Top 10 {trade}s Near You - Yelp
  - Best {trade}s Near Me - Angi
emergency {trade} near me open now
  - 24 Hour Emergency {trade} - Yelp
  - Emergency {trade} Services Open Now - Thumbtack
{trade} cost per hour
  - How Much Does a {trade} Cost Per Hour? - HomeGuide
  - {trade} Rates 2024 - Angi
how to find a licensed {trade}
  - How to Hire a Licensed {trade} - Angi
  - Verify a Contractor License - State Licensing Board

## dmv real id
= state: California; Texas; Illinois
{state} dmv appointment
  - Make an Appointment - {state} DMV
  - {state} DMV Appointments Online
{state} dmv appointment wait time
  - {state} DMV Wait Times by Office
  - How long is the DMV wait? : r/{state} - Reddit
  - REAL ID Documents Checklist - {state} DMV
{state} real id documents
  - REAL ID Document Checklist - {state} DMV
  - What Do I Need for a REAL ID in {state}?
real id deadline
  - REAL ID Enforcement Deadline - TSA
  - REAL ID - Homeland Security

## restaurants
= food: Thai; Sushi; Vegan; Ramen
{food} restaurants near me
  - Best {food} Restaurants Near Me - Yelp
  - {food} Near Me - Google Maps
best {food} restaurant downtown
  - The 10 Best {food} Restaurants Downtown - Tripadvisor
  - Best {food} spot downtown? : r/FoodLovers - Reddit
{food} restaurant open late
  - Late Night {food} Near Me - Yelp
  - {food} Open Now - Google Maps
{food} delivery near me
  - {food} Delivery Near Me - DoorDash
  - Order {food} Online - Uber Eats

## moving
moving companies near me
  - Best Moving Companies Near Me - Yelp
  - Top Rated Local Movers - Angi
  - How Much Do Local Movers Cost for a 2 Bedroom? - HomeGuide
moving company cost local 2 bedroom
  - How Much Do Local Movers Cost? 2 Bedroom Prices - HomeGuide
  - Average Cost of Movers for a 2 Bedroom - Forbes Home
  - Moving Truck Rental vs Movers: One Way Costs - Moving.com
moving truck rental one way
  - One Way Truck Rental - U-Haul
  - One-Way Moving Truck Rentals - Penske
u haul one way truck rental cost
  - How Much Does a U-Haul One Way Rental Cost? - Moving.com
  - U-Haul one way prices insane? : r/moving - Reddit

## passport renewal
renew passport
  - Renew an Adult Passport - Travel.State.Gov
  - How to Renew Your Passport - USA.gov
renew passport online
  - Online Passport Renewal - Travel.State.Gov
  - Can You Renew Your Passport Online? - NerdWallet
passport renewal processing time
  - Processing Times for U.S. Passports - Travel.State.Gov
  - Passport renewal times right now? : r/passport - Reddit
expedited passport renewal
  - Expedited Passport Service - Travel.State.Gov
  - How to Expedite a Passport Renewal - USA.gov
  - Form DS-82 and Fees for Expedited Renewal - Travel.State.Gov
ds-82 form
  - Form DS-82: Passport Renewal Application - Travel.State.Gov
  - How to Fill Out Form DS-82 - NerdWallet

## name change after marriage
change name after marriage
  - How to Change Your Last Name After Marriage - USA.gov
  - Name Change After Marriage Checklist - The Knot
change name on social security card after marriage
  - Change Name With Social Security - SSA.gov
  - How to Change Your Name on Your Social Security Card
  - Application for a Social Security Card (Form SS-5) - SSA.gov
ss-5 form
  - Form SS-5: Application for a Social Security Card - SSA
  - How to Fill Out Form SS-5 - NerdWallet
change name on drivers license after marriage
  - Change Your Name on a Driver's License - DMV.org
  - Name change at the DMV after marriage : r/weddingplanning

## jury duty
jury duty summons
  - Juror Information - United States Courts
  - What to Do When You Get a Jury Summons - Nolo
how to postpone jury duty
  - Request to Postpone Jury Service - Superior Court
  - How to Postpone Jury Duty - Nolo
jury duty excuses
  - Valid Excuses for Jury Duty - Nolo
  - Can You Get Out of Jury Duty? - LegalZoom
does my employer have to pay me for jury duty
  - Jury Duty Pay Laws by State - Nolo
  - Does Your Employer Have to Pay You for Jury Duty? - SHRM

## baby sleep
= age: 4 Month; 6 Month; 9 Month
{age} old sleep schedule
  - {age} Old Sleep Schedule - Taking Cara Babies
  - Sample Sleep Schedule for a {age} Old - BabyCenter
{age} old waking up at night
  - Why Is My {age} Old Waking Up at Night? - What to Expect
  - {age} old suddenly waking every 2 hours : r/beyondthebump
{age} sleep regression
  - The {age} Sleep Regression: Signs and Tips - Healthline
  - {age} Sleep Regression - Sleep Foundation
{age} sleep regression how long does it last
  - How Long Does the {age} Sleep Regression Last? - BabyCenter
  - {age} regression length? : r/sleeptrain - Reddit

## toddler tantrums
toddler tantrums
  - Temper Tantrums in Toddlers - HealthyChildren.org
  - Toddler Tantrums: How to Handle Them - NHS
how to handle toddler tantrums 2 year old
  - 8 Ways to Handle Tantrums in a 2 Year Old - Zero to Three
  - Dealing with 2 year old tantrums : r/toddlers - Reddit
toddler tantrums at bedtime
  - Bedtime Battles: Toddler Tantrums at Night - What to Expect
  - Toddler Bedtime Tantrums - Sleep Foundation
toddler bedtime routine chart
  - Free Printable Toddler Bedtime Routine Chart
  - How to Create a Toddler Bedtime Routine - BabyCenter

## baby led weaning
when to start solids baby
  - Starting Solid Foods - CDC
  - When to Start Baby on Solids - HealthyChildren.org
baby led weaning first foods
  - 15 Best First Foods for Baby-Led Weaning - Solid Starts
  - Baby-Led Weaning: First Foods - BabyCenter
baby led weaning gagging vs choking
  - Gagging vs Choking: What Parents Should Know - Solid Starts
  - Is it gagging or choking? : r/BabyLedWeaning - Reddit
baby led weaning recipes 6 months
  - 25 Baby-Led Weaning Recipes for 6 Months - Yummy Toddler Food
  - Easy BLW Recipes for 6 Month Olds - Baby Foode

## growing vegetables
= veg: Tomatoes; Peppers; Cucumbers; Zucchini
growing {veg} in pots
  - How to Grow {veg} in Containers - The Spruce
  - Growing {veg} in Pots - RHS
best {veg} varieties for containers
  - 10 Best {veg} Varieties for Pots - Gardener's Path
  - Best container {veg}? : r/vegetablegardening
  - {veg} Leaves Turning Yellow in Pots - Gardener's Path
{veg} leaves turning yellow
  - Why Are My {veg} Leaves Turning Yellow? - The Spruce
  - Yellow leaves on {veg}: causes - Gardeners' World
{veg} fertilizer schedule
  - When and How to Fertilize {veg} - Epic Gardening
  - Best Fertilizer for {veg} - Bonnie Plants

## lawn brown patches
brown patches in lawn
  - Brown Patches in Lawn: Causes and Fixes - Scotts
  - What Causes Brown Spots on Grass? - The Spruce
brown patches in lawn grubs
  - How to Tell If You Have Grubs - Scotts
  - Lawn Grubs: Signs of Damage - Lawn Doctor
how to get rid of grubs in lawn
  - How to Get Rid of Grubs in Your Lawn - Scotts
  - Grub control that actually works? : r/lawncare - Reddit
when to apply grub control
  - When to Apply Grub Control - Scotts
  - Best Time for Grub Treatment - Lawn Love

## houseplant care
= plant: Monstera; Fiddle Leaf Fig; Pothos; Snake Plant
{plant} care
  - {plant} Care Guide - The Sill
  - How to Care for a {plant} - The Spruce
  - {plant} Leaves Turning Brown or Yellow? - The Spruce
{plant} leaves turning brown
  - Why Are My {plant} Leaves Turning Brown? - Bloomscape
  - Brown spots on {plant} : r/plantclinic - Reddit
{plant} overwatering signs
  - Signs of an Overwatered {plant} - Greg
  - Overwatered {plant}: How to Save It - The Spruce
how often to water {plant}
  - How Often Should You Water a {plant}? - The Sill
  - {plant} Watering Guide - Bloomscape

## check engine light
= car: Honda Civic; Toyota Camry; Ford F-150
{car} check engine light
  - {car} Check Engine Light: Common Causes - RepairPal
  - What Does the Check Engine Light Mean? - Kelley Blue Book
{car} check engine light flashing
  - Flashing Check Engine Light: What to Do - AutoZone
  - {car} check engine light blinking : r/MechanicAdvice
  - P0301 Misfire Code on a {car} - RepairPal
{car} misfire code p0301
  - P0301 Code: Cylinder 1 Misfire - RepairPal
  - {car} P0301 Fix - YouTube
  - {car} Spark Plug Replacement Cost - RepairPal
{car} spark plug replacement cost
  - {car} Spark Plug Replacement Cost Estimate - RepairPal
  - How Much to Replace Spark Plugs? - Kelley Blue Book

## buying a car
= car: Toyota RAV4; Honda CR-V; Subaru Outback
{car} 2024 price
  - 2024 {car} Prices, Reviews and Pictures - Edmunds
  - 2024 {car} Price - Kelley Blue Book
{car} 2024 trims compared
  - 2024 {car} Trims Compared - Car and Driver
  - Which 2024 {car} Trim Should You Buy? - Edmunds
{car} hybrid mpg
  - {car} Hybrid MPG and Fuel Economy - Fueleconomy.gov
  - 2024 {car} Hybrid Review - MotorTrend
{car} lease deals
  - {car} Lease Deals and Specials - Edmunds
  - Current {car} Lease Offers - TrueCar

## tires
when to replace tires
  - When to Replace Your Tires - Tire Rack
  - How Long Do Tires Last? - Consumer Reports
  - Check Tire Tread Depth With the Penny Test - Goodyear
tire tread depth penny test
  - The Penny Test for Tire Tread Depth - Bridgestone
  - How to Check Tire Tread With a Penny - Goodyear
  - Best All-Season Tires Ranked by Tread Life - Tire Rack
best all season tires
  - Best All-Season Tires of 2024 - Consumer Reports
  - Best All-Season Tires - Tire Rack
  - Costco Tire Deals and Installation - Costco
costco tire installation cost
  - Costco Tire Center: Installation Package - Costco
  - Costco tire install price? : r/Costco - Reddit

## puppy biting
puppy biting hands
  - Puppy Biting: Why They Do It and How to Stop It - AKC
  - Puppy Nipping - The Humane Society
how to stop puppy biting
  - How to Stop a Puppy From Biting - American Kennel Club
  - Stopping puppy biting, what worked? : r/puppy101 - Reddit
  - Puppy Teething: Age and Timeline - AKC
puppy teething age
  - Puppy Teething Timeline - PetMD
  - When Do Puppies Stop Teething? - AKC
  - Best Chew Toys for Teething Puppies - Chewy
best chew toys for teething puppies
  - Best Chew Toys for Teething Puppies - AKC
  - The Best Puppy Teething Toys - Wirecutter

## cat vomiting
cat throwing up
  - Cat Vomiting: Causes and When to Worry - PetMD
  - Why Is My Cat Throwing Up? - VCA Animal Hospitals
cat throwing up after eating
  - Why Does My Cat Throw Up After Eating? - PetMD
  - Cat vomits right after eating : r/CatAdvice - Reddit
cat eating too fast
  - How to Stop a Cat From Eating Too Fast - The Spruce Pets
  - Cats Eating Too Fast: Causes and Tips - Catster
  - Slow Feeder Bowls for Cats That Eat Too Fast - Catster
slow feeder bowl for cats
  - The Best Slow Feeder Bowls for Cats - The Spruce Pets
  - Best Slow Feeder Cat Bowls - Wirecutter

## dog ate something
= food: Grapes; Chocolate; Onions; Xylitol Gum
can dogs eat {food}
  - Can Dogs Eat {food}? - American Kennel Club
  - Dogs and {food}: Are They Safe? - PetMD
  - What to Do If Your Dog Ate {food} - AKC
my dog ate {food} what to do
  - My Dog Ate {food}: What Should I Do? - PetMD
  - {food} Toxicity in Dogs - VCA Animal Hospitals
  - Call the Pet Poison Helpline or Your Vet Now - PetMD
pet poison helpline number
  - Pet Poison Helpline - 24/7 Animal Poison Control
  - ASPCA Animal Poison Control Center
pet poison helpline cost
  - Pet Poison Helpline Fees - Pet Poison Helpline
  - Is the ASPCA Poison Control Fee Worth It? - Reddit

## first home buyer
= state: Texas; Florida; Ohio
first time home buyer programs {state}
  - First-Time Homebuyer Programs in {state} - NerdWallet
  - {state} Homebuyer Assistance - HUD.gov
{state} first time home buyer down payment assistance
  - {state} Down Payment Assistance Programs 2024 - Bankrate
  - Down Payment Assistance - {state} Housing Agency
  - FHA Loan Requirements for First-Time Buyers - Bankrate
fha loan requirements 2024
  - FHA Loan Requirements for 2024 - Bankrate
  - FHA Loans: Credit Score and Down Payment - Rocket Mortgage
fha loan vs conventional
  - FHA vs Conventional Loans: Which Is Better? - NerdWallet
  - FHA vs Conventional Loan - Bankrate

## small claims court
small claims court
  - Small Claims Court: How It Works - Nolo
  - Small Claims - USA.gov
how to file in small claims court
  - How to File a Small Claims Case - Nolo
  - Filing a Small Claims Lawsuit: Step by Step - LegalZoom
small claims court limit by state
  - Small Claims Court Limits by State - Nolo
  - Small Claims Dollar Limits - FindLaw
small claims court security deposit landlord
  - Suing Your Landlord for a Security Deposit - Nolo
  - Getting your deposit back in small claims : r/legaladvice

## learning to knit
how to knit for beginners
  - How to Knit: A Beginner's Guide - Wool and the Gang
  - Learn to Knit - Knitting Help
  - Knit Stitch and Purl Stitch for Beginners - Purl Soho
knit stitch vs purl stitch
  - Knit Stitch vs Purl Stitch: The Difference - Sheep and Stitch
  - How to Purl for Beginners - Knitting Help
easy knitting patterns for beginners scarf
  - 20 Easy Knit Scarf Patterns for Beginners - Ravelry
  - Beginner Scarf Pattern (Free) - Purl Soho
how to cast off knitting
  - How to Bind Off (Cast Off) Knitting - Sheep and Stitch
  - Binding Off for Beginners - Purl Soho

## science homework
= topic: Photosynthesis; Cell Respiration; The Water Cycle
{topic} explained
  - {topic} - Wikipedia
  - {topic} Explained Simply - BBC Bitesize
{topic} explained for kids
  - {topic} for Kids - National Geographic Kids
  - {topic} for Kids - Science Made Simple
  - {topic} Diagram Labeled for Kids - BBC Bitesize
{topic} diagram labeled
  - Labeled {topic} Diagram - Science Learning Hub
  - {topic} Diagram Worksheet (Printable)
  - {topic} Quiz Questions - Quizlet
{topic} quiz questions
  - {topic} Quiz - Quizlet
  - {topic} Quiz Questions and Answers - BBC Bitesize

## weather and outdoors
= city: Seattle; Denver; Austin
{city} weather this weekend
  - {city} Weekend Weather Forecast - Weather.com
  - {city} Weather - AccuWeather
{city} weather saturday hourly
  - Hourly Weather Forecast for {city} - Weather.com
  - {city} Hourly Forecast - National Weather Service
  - Best Hiking Trails Near {city} This Weekend - AllTrails
hiking trails near {city}
  - Best Hiking Trails Near {city} - AllTrails
  - 15 Best Hikes Near {city} - Outdoor Project
easy hiking trails near {city} dog friendly
  - Dog Friendly Trails Near {city} - AllTrails
  - Best dog friendly hikes near {city}? : r/hiking

## pet adoption
= pet: Dog; Cat; Rabbit
adopt a {pet} near me
  - Adopt a {pet} Near You - Petfinder
  - {pet} Adoption - ASPCA
{pet} adoption fee
  - How Much Does It Cost to Adopt a {pet}? - Petfinder
  - {pet} Adoption Fees Explained - The Spruce Pets
  - First-Time {pet} Owner Checklist and Costs - ASPCA
first time {pet} owner checklist
  - First-Time {pet} Owner Checklist - ASPCA
  - New {pet} Checklist: Everything You Need - Chewy
  - {pet} Supplies List: What to Buy - Petco
{pet} supplies list
  - {pet} Supplies: The Complete Shopping List - PetMD
  - {pet} Starter Kit - Chewy

## phone upgrade
= phone: iPhone 15; Pixel 8; Galaxy S24
{phone} vs {phone} pro
  - {phone} vs {phone} Pro: Which Should You Buy? - Tom's Guide
  - {phone} and {phone} Pro - Compare Models - Official Store
{phone} trade in value
  - Trade In Your Phone for {phone} Credit - Official Store
  - Best {phone} Trade-In Deals - CNET
{phone} deals without trade in
  - Best {phone} Deals Without Trade-In - Tom's Guide
  - {phone} Deals - Best Buy
{phone} case with magsafe
  - The Best {phone} Cases - Wirecutter
  - Best {phone} Cases 2024 - 9to5Mac
"""


@dataclass
class Family:
    """One hand-written topic: a query chain, the titles a user may click after each query, and slots."""

    name: str
    slots: list[dict[str, str]]
    steps: list[tuple[str, list[str]]]


def parse_families(text: str) -> list[Family]:
    """Read the FAMILIES text format (see the comment above it)."""
    families: list[Family] = []
    for block in text.strip().split("\n## "):
        lines = block.removeprefix("## ").splitlines()
        family = Family(name=lines[0].strip(), slots=[], steps=[])
        for line in lines[1:]:
            if not line.strip():
                continue
            if line.startswith("= "):
                names, values = line[2:].split(":", 1)
                keys = [k.strip() for k in names.split(",")]
                for combo in values.split(";"):
                    parts = [v.strip() for v in combo.split(",")]
                    if len(parts) != len(keys):
                        raise ValueError(f"{family.name}: slot values {combo!r} do not match {keys}")
                    family.slots.append(dict(zip(keys, parts)))
            elif line.startswith("  - "):
                family.steps[-1][1].append(line[4:].strip())
            else:
                family.steps.append((line.strip(), []))
        if len(family.steps) < 2:
            raise ValueError(f"{family.name}: a chain needs at least 2 queries")
        families.append(family)
    return families


def fill(text: str, values: dict[str, str], lower: bool) -> str:
    """Put slot values into ``{name}`` places; lowercase them for queries."""
    def value(match: re.Match) -> str:
        found = values[match.group(1)]
        return found.lower() if lower else found

    return re.sub(r"\{(\w+)\}", value, text)


def weighted(rng: random.Random, weights: dict[int, float]) -> int:
    """Draw one key of ``weights`` with its probability."""
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def user_chain(family: Family, values: dict[str, str], rng: random.Random) -> list[dict]:
    """One user's queries on a topic, each with the results they clicked."""
    steps = list(family.steps)
    if len(steps) >= 5 and rng.random() < SKIP_STEP_PROBABILITY:
        del steps[rng.randrange(1, len(steps) - 1)]
    chain = []
    for i, (query, titles) in enumerate(steps):
        next_query = steps[i + 1][0] if i + 1 < len(steps) else ""
        clicked = pick_clicks(titles, next_query, weighted(rng, CLICKS_WEIGHTS), rng)
        chain.append({"query": fill(query, values, lower=True), "clicked": [fill(t, values, False) for t in clicked]})
    return chain


def pick_clicks(titles: list[str], next_query: str, count: int, rng: random.Random) -> list[str]:
    """Draw clicked titles, favouring those sharing words with the next query.

    Real users often refine with words from the result they just read, which is what makes the next query
    partly predictable from the history.
    """
    next_words = set(next_query.lower().split())
    remaining = list(titles)
    clicked = []
    for _ in range(min(count, len(remaining))):
        weights = [1 + CLICK_OVERLAP_BONUS * len(next_words & set(t.lower().split())) for t in remaining]
        choice = rng.choices(remaining, weights=weights)[0]
        remaining.remove(choice)
        clicked.append(choice)
    return clicked


def prompt_size(record: dict) -> int:
    """Length of the plain-text prompt in characters, digits counted thrice (SmolLM2 gives each its own token)."""
    text = render_prompt(parse_session(record, record["id"]), chat=False)
    return len(text) + 2 * sum(c.isdigit() for c in text)


def fit_budget(record: dict) -> dict:
    """Drop clicks, oldest first, until the plain-text prompt fits MAX_PROMPT_CHARS."""
    while prompt_size(record) > MAX_PROMPT_CHARS:
        with_clicks = [entry for entry in record["history"] if entry["clicked"]]
        if not with_clicks:
            break
        with_clicks[0]["clicked"].pop()
    return record


def build_records(families: list[Family], rng: random.Random) -> list[dict]:
    """All sessions: per topic a few users, per user 1-3 (history, next query) pairs from their chain."""
    records = []
    user_number = 0
    for family in families:
        slot_choices = rng.sample(family.slots, min(USERS_PER_TOPIC, len(family.slots))) if family.slots else [{}]
        for values in slot_choices:
            user_number += 1
            user_id = f"u{user_number:03d}"
            chain = user_chain(family, values, rng)
            # A target is any query after the first; history is everything typed before it (1-4 queries).
            count = min(weighted(rng, SESSIONS_PER_USER_WEIGHTS), len(chain) - 1)
            positions = sorted(rng.sample(range(1, len(chain)), count))
            for k, position in enumerate(positions, 1):
                before = chain[max(0, position - 4) : position]
                history = [dict(entry, clicked=list(entry["clicked"])) for entry in before]
                record = {
                    "id": f"{user_id}-{k}",
                    "user_id": user_id,
                    "topic": family.name,
                    "history": history,
                    "target_query": chain[position]["query"],
                }
                seen = {normalize_query(entry["query"]) for entry in history}
                if normalize_query(record["target_query"]) in seen:
                    raise ValueError(f"{record['id']}: target repeats an earlier query")
                records.append(fit_budget(record))
    return records


def dump(records: list[dict]) -> str:
    """JSONL text, one record a line, UTF-8 kept readable."""
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def main() -> int:
    """Build the dataset and write it (or, with --check, compare it with the files on disk)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the files are up to date")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder")
    args = parser.parse_args()

    rng = random.Random(SEED)
    records = build_records(parse_families(FAMILIES), rng)
    sessions = [parse_session(record, record["id"]) for record in records]
    train, test = split_sessions(sessions, test_fraction=0.2, seed=SEED, by_user=True)
    by_id = {record["id"]: record for record in records}
    texts = {
        "train.jsonl": dump([by_id[s.id] for s in train]),
        "test.jsonl": dump([by_id[s.id] for s in test]),
    }
    if args.check:
        stale = [name for name, text in texts.items() if not (args.out / name).is_file()
                 or (args.out / name).read_text(encoding="utf-8") != text]
        if stale:
            print(f"out of date: {', '.join(stale)}; run python scripts/make_querygen_data.py", file=sys.stderr)
            return 1
        print("up to date")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (args.out / name).write_text(text, encoding="utf-8")
    users = {s.user_id for s in sessions}
    topics = {r["topic"] for r in records}
    print(f"{len(records)} sessions ({len(train)} train, {len(test)} test), {len(users)} users, "
          f"{len(topics)} topics -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
